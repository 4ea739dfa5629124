"""Control maps for ControlNet, computed from images with tensor ops, and control images read from files.

- ``mask``: segmentation by colour (captioned shapes): a pixel belongs to an object if its saturation
  (max − min channel, on [0, 1]) exceeds 0.4 (backgrounds are grey, shapes flat saturated colours) and takes the
  nearest palette colour; one channel per colour, one-hot.
- ``edges``: the Sobel gradient magnitude of the luminance, thresholded (a Canny-like edge map without the
  hysteresis), one channel.
- ``centers``: a Gaussian bump (σ = 4 % of the side) at the centroid of every connected object, one channel.

All maps are in [0, 1], shape (B, C, H, W), from images in [−1, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .captions import COLORS

__all__ = ["CONTROL_KINDS", "SATURATION", "center_heatmap", "color_segmentation", "control_channels", "control_map",
           "edge_map", "load_control_images", "segmentation_map"]  # fmt: skip

SATURATION = 0.4
CONTROL_KINDS = ("mask", "edges", "centers")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def color_segmentation(images: Tensor) -> Tensor:
    """(B, H, W) long: the palette index of each object pixel of images (B, 3, H, W) in [−1, 1], −1 elsewhere."""
    x = (images.detach().float().clamp(-1, 1) + 1) / 2
    coloured = x.amax(1) - x.amin(1) > SATURATION
    palette = torch.tensor(list(COLORS.values()), dtype=x.dtype, device=x.device)  # (K, 3)
    nearest = ((x[:, None] - palette[None, :, :, None, None]) ** 2).sum(2).argmin(1)
    return torch.where(coloured, nearest, -1)


def segmentation_map(images: Tensor) -> Tensor:
    """One-hot colour segmentation (B, len(COLORS), H, W)."""
    seg = color_segmentation(images)
    return F.one_hot(seg.clamp_min(0), len(COLORS)).permute(0, 3, 1, 2).float() * (seg >= 0)[:, None].float()


def edge_map(images: Tensor, threshold: float = 0.25) -> Tensor:
    """1 where the Sobel gradient magnitude of the luminance (on [0, 1]) exceeds ``threshold`` (B, 1, H, W)."""
    x = (images.detach().float().clamp(-1, 1) + 1) / 2
    luma = (
        x.mean(1, keepdim=True)
        if x.shape[1] != 3
        else (x * x.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    )
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx and d/dy
    grad = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), k)
    return (grad.square().sum(1, keepdim=True).sqrt() > threshold).float()


def center_heatmap(images: Tensor, sigma: float = 0.04) -> Tensor:
    """max over objects of exp(−‖p − c‖² / (2 (σ·H)²)) at each object's centroid c (B, 1, H, W)."""
    from scipy import ndimage

    seg = color_segmentation(images).cpu().numpy()
    b, h, w = seg.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((b, 1, h, w), np.float32)
    for i in range(b):
        for k in range(len(COLORS)):
            comp, n = ndimage.label(seg[i] == k, structure=np.ones((3, 3)))
            for j in range(1, n + 1):
                ys, xs = np.nonzero(comp == j)
                bump = np.exp(-((yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2) / (2 * (sigma * h) ** 2))
                out[i, 0] = np.maximum(out[i, 0], bump)
    return torch.from_numpy(out).to(images.device)


def control_channels(kind: str) -> int:
    return len(COLORS) if kind == "mask" else 1


def control_map(kind: str, images: Tensor) -> Tensor:
    """The ``kind`` control map of images in [−1, 1]."""
    fns = {"mask": segmentation_map, "edges": edge_map, "centers": center_heatmap}
    if kind not in fns:
        raise ValueError(f"unknown control kind '{kind}'; choose one of {list(fns)}")
    return fns[kind](images)


def load_control_images(path: str | Path, size: int, channels: int) -> Tensor:
    """Control images from a PNG/JPEG file or a folder of them (sorted by name) as (N, channels, size, size) in
    [0, 1]: grey maps for one channel, RGB maps for three, colour images turned into the one-hot ``mask`` map for
    ``len(COLORS)``. Another size is resized (nearest neighbour, so maps stay maps) with a warning."""
    from PIL import Image

    p = Path(path)
    files = (
        sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")) if p.is_dir() else [p]
    )
    if not p.exists() or not files:
        raise FileNotFoundError(f"control image {p} not found (a PNG/JPEG file or a folder of them)")
    out = []
    for f in files:
        try:
            img = Image.open(f)
            img.load()
        except OSError as e:
            raise ValueError(f"control image {f} cannot be read: {e}") from None
        mode = "L" if channels == 1 else "RGB"
        x = torch.from_numpy(np.asarray(img.convert(mode), np.float32) / 255.0)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        if x.shape[-2:] != (size, size):
            warnings.warn(f"control image {f} is {x.shape[-1]}×{x.shape[-2]}, resized to {size}×{size}", stacklevel=2)
            x = F.interpolate(x[None], size=(size, size), mode="nearest")[0]
        if channels == len(COLORS):
            x = segmentation_map(x[None] * 2 - 1)[0]
        out.append(x)
    return torch.stack(out)
