"""Captioned shapes: a procedural text-to-image dataset whose ground truth is known exactly.

Each image holds 1–3 flat-coloured shapes (:data:`~sdeflow.data.captions.SHAPES` in
:data:`~sdeflow.data.captions.COLORS`, small or large) in the cells of a 3×3 grid, on a plain or textured grey
background, with a caption that states some of its attributes (:mod:`~sdeflow.data.captions`) and a label map
(0 background, k the k-th object) giving the per-object masks. Everything is a function of (seed, split, index):
the set is unlimited and any item can be rebuilt alone.

Splits: ``train`` never shows the (colour, shape) pairs of :data:`HELD_OUT`; ``heldout`` shows one in every
image, so a model is tested on combinations it never saw (compositional generalisation). Objects never touch
(at least one background pixel between them), so connected components recover them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .captions import COLORS, POSITIONS, PREFIXES, RELATIONS, SHAPES, SIZES, CaptionSpec, ObjectSpec, word_caption
from .images import ArrayImageDataset

__all__ = ["CELL_CENTERS", "HELD_OUT", "SHAPE_SPLITS", "SIZE_RADIUS", "Scene", "ShapesDataset", "make_scene", "render"]

HELD_OUT = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
SHAPE_SPLITS = ("train", "heldout")
CELL_CENTERS = (0.18, 0.5, 0.82)  # of the image side, per grid row / column
SIZE_RADIUS = {"small": 0.1, "large": 0.14}  # half the shape's extent, of the image side
JITTER = 0.02
KINDS = ("single", "single", "relation", "count", "list")  # drawn uniformly: singles twice as often


@dataclass(frozen=True)
class Placed:
    """An object of a scene: what it is and where (centre in [0, 1]² image coordinates, y down)."""

    color: str
    shape: str
    size: str
    cell: int  # index into POSITIONS
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Placed, ...]
    spec: CaptionSpec  # what the caption states
    caption: str
    background: tuple[float, float, float]  # (grey level in [0, 0.45], texture amplitude, texture seed)


def _shape_mask(shape: str, cx: float, cy: float, r: float, res: int) -> np.ndarray:
    """Boolean (res, res) mask of one shape of half-extent r centred at (cx, cy), pixel centres at (i + ½)/res."""
    c = (np.arange(res) + 0.5) / res
    y, x = np.meshgrid(c, c, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up, base at cy + r: |dx| ≤ r (dy + r) / (2r)
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":  # a plus sign with arms 0.7 r thick
        t = 0.35 * r
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _separated(masks: list[np.ndarray]) -> bool:
    """No two masks touch, diagonally included (each dilated by one pixel misses the others)."""
    for i, a in enumerate(masks):
        p = np.pad(a, 1)
        grown = np.zeros_like(a)
        for oy in (0, 1, 2):
            for ox in (0, 1, 2):
                grown |= p[oy : oy + a.shape[0], ox : ox + a.shape[1]]
        if any((grown & b).any() for b in masks[i + 1 :]):
            return False
    return True


def render(scene: Scene, resolution: int) -> tuple[Tensor, Tensor]:
    """(image (3, R, R) in [-1, 1], label map (R, R) uint8: 0 background, k the k-th object)."""
    grey, amp, tex = scene.background
    img = np.full((resolution, resolution), grey, dtype=np.float32)
    if amp > 0:  # a smooth grey texture: sums of a few random plane waves
        g = np.random.default_rng(int(tex))
        c = (np.arange(resolution) + 0.5) / resolution
        y, x = np.meshgrid(c, c, indexing="ij")
        for _ in range(3):
            fx, fy, ph = g.uniform(-6, 6), g.uniform(-6, 6), g.uniform(0, 2 * np.pi)
            img += amp / 3 * np.sin(2 * np.pi * (fx * x + fy * y) + ph).astype(np.float32)
    rgb = np.repeat(img[None], 3, 0)
    labels = np.zeros((resolution, resolution), dtype=np.uint8)
    for k, o in enumerate(scene.objects, start=1):
        m = _shape_mask(o.shape, o.cx, o.cy, SIZE_RADIUS[o.size], resolution)
        rgb[:, m] = np.asarray(COLORS[o.color], dtype=np.float32)[:, None]
        labels[m] = k
    return torch.from_numpy(rgb * 2 - 1), torch.from_numpy(labels)


def _allowed(color: str, shape: str, split: str) -> bool:
    return split == "heldout" or (color, shape) not in HELD_OUT


def make_scene(seed: int, index: int, split: str = "train", resolution: int = 32) -> Scene:
    """The scene of item ``index`` of ``split`` (a function of (seed, split, index) alone)."""
    if split not in SHAPE_SPLITS:
        raise ValueError(f"captioned shapes: unknown split {split!r}; choose one of {SHAPE_SPLITS}")
    g = np.random.default_rng([seed, SHAPE_SPLITS.index(split), index])
    while True:  # rejection: held-out pairs out of train, objects apart
        scene = _draw(g, split)
        masks = [_shape_mask(o.shape, o.cx, o.cy, SIZE_RADIUS[o.size], resolution) for o in scene.objects]
        if _separated(masks):
            return scene


def _pair(g: np.random.Generator, split: str, must_hold_out: bool) -> tuple[str, str]:
    if must_hold_out:
        return HELD_OUT[g.integers(len(HELD_OUT))]
    while True:
        color, shape = list(COLORS)[g.integers(len(COLORS))], SHAPES[g.integers(len(SHAPES))]
        if _allowed(color, shape, split):
            return color, shape


def _draw(g: np.random.Generator, split: str) -> Scene:
    kind = KINDS[g.integers(len(KINDS))]
    n = {"single": 1, "relation": 2, "count": int(g.integers(2, 4)), "list": int(g.integers(2, 4))}[kind]
    cells = g.permutation(9)[:n].tolist()
    if kind == "relation":  # two cells apart along the relation's axis
        rel = RELATIONS[g.integers(len(RELATIONS))]
        axis = 1 if rel in ("left of", "right of") else 0
        while divmod(cells[0], 3)[axis] == divmod(cells[1], 3)[axis]:
            cells = g.permutation(9)[:2].tolist()
        first_smaller = divmod(cells[0], 3)[axis] < divmod(cells[1], 3)[axis]
        if first_smaller != (rel in ("left of", "above")):
            cells = cells[::-1]
    heldout_at = int(g.integers(n)) if split == "heldout" else -1
    same = _pair(g, split, heldout_at >= 0) if kind == "count" else None
    size_all = SIZES[g.integers(2)]
    objects = []
    for k, cell in enumerate(cells):
        color, shape = same or _pair(g, split, k == heldout_at)
        size = size_all if kind == "count" else SIZES[g.integers(2)]
        row, col = divmod(cell, 3)
        jx, jy = g.uniform(-JITTER, JITTER, 2)
        objects.append(Placed(color, shape, size, cell, CELL_CENTERS[col] + jx, CELL_CENTERS[row] + jy))
    style, prefix = int(g.integers(2)), PREFIXES[g.integers(len(PREFIXES))]
    says_size, says_pos = bool(g.integers(2)), bool(g.integers(2))
    o0 = objects[0]
    if kind == "single":
        spec = CaptionSpec("single", (_spec(o0, says_size, says_pos),))
    elif kind == "count":
        spec = CaptionSpec("count", (ObjectSpec(o0.color, o0.shape, o0.size if says_size else None),), count=n)
    elif kind == "relation":
        spec = CaptionSpec("relation", (_spec(o0, False, False), _spec(objects[1], False, False)), relation=rel)
    else:
        spec = CaptionSpec("list", tuple(_spec(o, False, False) for o in objects))
    caption = word_caption(spec, style, prefix, swap=bool(g.integers(2)))
    background = (float(g.uniform(0, 0.45)), float(g.uniform(0, 0.12)) * int(g.integers(2)), float(g.integers(2**31)))
    return Scene(tuple(objects), spec, caption, background)


def _spec(o: Placed, size: bool, position: bool) -> ObjectSpec:
    return ObjectSpec(o.color, o.shape, o.size if size else None, POSITIONS[o.cell] if position else None)


class ShapesDataset(ArrayImageDataset):
    """``num`` captioned-shapes images of ``split`` at ``resolution`` px, items (image, caption index).

    ``captions`` is the table of distinct captions (``y`` indexes it; a text-conditioned objective encodes each
    once), ``scenes`` the ground truth of each image and ``label_maps`` its per-object masks."""

    def __init__(self, num: int, resolution: int = 32, split: str = "train", seed: int = 0):
        if resolution < 16:
            raise ValueError(f"captioned shapes need a resolution of at least 16 px, got {resolution}")
        self.scenes = [make_scene(seed, i, split, resolution) for i in range(num)]
        table: dict[str, int] = {}
        ids = [table.setdefault(s.caption, len(table)) for s in self.scenes]
        self.captions = list(table)
        pairs = [render(s, resolution) for s in self.scenes]
        super().__init__(torch.stack([p[0] for p in pairs]), torch.tensor(ids, dtype=torch.long))
        self.label_maps = torch.stack([p[1] for p in pairs])
        self.resolution, self.split, self.seed = resolution, split, seed

    def masks(self, i: int) -> Tensor:
        """(objects, R, R) boolean masks of item ``i``'s objects, in scene order."""
        lm = self.label_maps[i]
        return torch.stack([lm == k for k in range(1, len(self.scenes[i].objects) + 1)])
