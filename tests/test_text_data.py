"""Captioned shapes and the exact adherence metric: rendering by hand, the caption grammar both ways, the splits,
and the metric at ≈ 100 % on real images and near chance on shuffled captions."""

import random

import numpy as np
import pytest
import torch

from sdeflow.data.captions import COLORS, CaptionError, CaptionSpec, ObjectSpec, parse_caption, word_caption
from sdeflow.data.shapes import HELD_OUT, SIZE_RADIUS, Placed, Scene, ShapesDataset, _shape_mask, make_scene, render
from sdeflow.evaluation.adherence import adherence, detect_objects, score_caption


def test_shape_masks_by_hand():
    # 8×8 pixels, centres (i + ½)/8; every shape of half-extent ¼ centred in the image
    sq = np.zeros((8, 8), bool)
    sq[2:6, 2:6] = True
    assert (_shape_mask("square", 0.5, 0.5, 0.25, 8) == sq).all()
    circle = sq.copy()
    circle[[2, 2, 5, 5], [2, 5, 2, 5]] = False  # the corners lie at distance √2·3/16 > ¼
    assert (_shape_mask("circle", 0.5, 0.5, 0.25, 8) == circle).all()
    tri = np.zeros((8, 8), bool)
    tri[3:5, 3:5] = True  # apex up: rows widen downwards
    tri[5, 2:6] = True
    assert (_shape_mask("triangle", 0.5, 0.5, 0.25, 8) == tri).all()
    cross = np.zeros((8, 8), bool)
    cross[2:6, 3:5] = True
    cross[3:5, 2:6] = True
    assert (_shape_mask("cross", 0.5, 0.5, 0.25, 8) == cross).all()
    with pytest.raises(ValueError, match="unknown shape"):
        _shape_mask("star", 0.5, 0.5, 0.25, 8)


def test_render_colours_masks_and_background():
    scene = Scene((Placed("red", "square", "large", 0, 0.18, 0.18), Placed("blue", "circle", "small", 8, 0.82, 0.82)),
                  CaptionSpec("list", (ObjectSpec("red", "square"), ObjectSpec("blue", "circle"))), "x",
                  (0.25, 0.0, 0.0))  # fmt: skip
    img, labels = render(scene, 32)
    assert img.shape == (3, 32, 32) and labels.shape == (32, 32)
    assert torch.equal(
        img[:, labels == 1], torch.tensor([1.0, -1.0, -1.0])[:, None].expand(-1, int((labels == 1).sum()))
    )
    blue = torch.tensor([0.1, 0.2, 1.0]) * 2 - 1
    assert torch.allclose(img[:, labels == 2], blue[:, None].expand(-1, int((labels == 2).sum())))
    assert torch.allclose(img[:, labels == 0], torch.tensor(-0.5))  # plain grey 0.25 → -0.5
    ys, xs = torch.nonzero(labels == 1, as_tuple=True)
    assert abs((xs.float().mean() + 0.5) / 32 - 0.18) < 1 / 32 and abs((ys.float().mean() + 0.5) / 32 - 0.18) < 1 / 32
    assert int((labels == 1).sum()) == int(_shape_mask("square", 0.18, 0.18, 0.14, 32).sum())


def test_dataset_is_a_function_of_seed_split_index():
    a, b = ShapesDataset(6, 32, seed=3), ShapesDataset(10, 32, seed=3)
    assert torch.equal(a.x, b.x[:6]) and [s.caption for s in a.scenes] == [s.caption for s in b.scenes[:6]]
    assert make_scene(3, 4) == make_scene(3, 4)
    assert make_scene(3, 4) != make_scene(4, 4) and make_scene(3, 4, "train") != make_scene(3, 4, "heldout")
    c = ShapesDataset(10, 32, seed=4)
    assert not torch.equal(b.x, c.x)
    for i, s in enumerate(b.scenes):
        assert b.captions[int(b.y[i])] == s.caption
    assert len(set(b.captions)) == len(b.captions)
    with pytest.raises(ValueError, match="split"):
        make_scene(0, 0, "test")


def test_masks_agree_with_the_scene():
    ds = ShapesDataset(60, 32, seed=1)
    for i, scene in enumerate(ds.scenes):
        masks = ds.masks(i)
        assert len(masks) == len(scene.objects)
        for m, o in zip(masks, scene.objects):
            assert m.any()
            colour = (torch.tensor(COLORS[o.color]) * 2 - 1)[:, None]
            assert torch.allclose(ds.x[i][:, m], colour.expand(-1, int(m.sum())))
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert abs((xs.float().mean() + 0.5) / 32 - o.cx) < 1.5 / 32
            drop = SIZE_RADIUS[o.size] / 3 if o.shape == "triangle" else 0.0  # a triangle's centroid: ⅓ r below
            assert abs((ys.float().mean() + 0.5) / 32 - o.cy - drop) < 1.5 / 32
        bg = ds.label_maps[i] == 0
        assert torch.allclose(ds.x[i][0, bg], ds.x[i][1, bg]) and torch.allclose(ds.x[i][1, bg], ds.x[i][2, bg])
        grown = torch.nn.functional.max_pool2d(masks.float()[:, None], 3, 1, 1)[:, 0] > 0  # objects never touch
        for j in range(len(masks)):
            for k in range(len(masks)):
                assert j == k or not (grown[j] & masks[k]).any()


def test_splits_hold_out_colour_shape_pairs():
    train = [make_scene(0, i, "train") for i in range(400)]
    held = [make_scene(0, i, "heldout") for i in range(200)]
    assert not any((o.color, o.shape) in HELD_OUT for s in train for o in s.objects)
    assert all(any((o.color, o.shape) in HELD_OUT for o in s.objects) for s in held)
    kinds = {s.spec.kind for s in train}
    assert kinds == {"single", "relation", "count", "list"}


def _canonical(spec: CaptionSpec) -> tuple:
    if spec.kind == "relation" and spec.relation in ("right of", "below"):
        flip = {"right of": "left of", "below": "above"}[spec.relation]
        return ("relation", (spec.objects[1], spec.objects[0]), spec.count, flip)
    return (spec.kind, spec.objects, spec.count, spec.relation)


def test_captions_parse_back_to_what_the_scene_states():
    for split in ("train", "heldout"):
        for i in range(300):
            s = make_scene(5, i, split)
            assert _canonical(parse_caption(s.caption)) == _canonical(s.spec), s.caption


def test_scenes_satisfy_their_captions():
    for i in range(300):
        s = make_scene(2, i)
        o = s.objects
        if s.spec.kind == "relation":
            a, b = o[0], o[1]
            d = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
            assert d[s.spec.relation] > 0.2
        if s.spec.kind == "count":
            assert len({(x.color, x.shape, x.size) for x in o}) == 1 and len(o) == s.spec.count
        for spec_o, obj in zip(s.spec.objects, o):
            assert (spec_o.color, spec_o.shape) == (obj.color, obj.shape)
            assert spec_o.size in (None, obj.size)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("a small red circle at the top left",
         CaptionSpec("single", (ObjectSpec("red", "circle", "small", "top left"),))),
        ("A picture of a large cyan cross in the bottom right corner.",
         CaptionSpec("single", (ObjectSpec("cyan", "cross", "large", "bottom right"),))),
        ("a green square in the center", CaptionSpec("single", (ObjectSpec("green", "square", None, "center"),))),
        ("a yellow triangle on the left", CaptionSpec("single", (ObjectSpec("yellow", "triangle", None, "left"),))),
        ("three small blue squares", CaptionSpec("count", (ObjectSpec("blue", "square", "small"),), count=3)),
        ("two purple crosses", CaptionSpec("count", (ObjectSpec("purple", "cross"),), count=2)),
        ("a red circle to the left of a blue square",
         CaptionSpec("relation", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), relation="left of")),
        ("a blue square right of a red circle",
         CaptionSpec("relation", (ObjectSpec("blue", "square"), ObjectSpec("red", "circle")), relation="right of")),
        ("a red circle below a blue square",
         CaptionSpec("relation", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), relation="below")),
        ("a red circle, a blue square and a green cross",
         CaptionSpec("list", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square"),
                              ObjectSpec("green", "cross")))),
    ],
)  # fmt: skip
def test_parse_caption_by_hand(text, spec):
    assert parse_caption(text) == spec


def test_caption_attributes_and_wording():
    spec = parse_caption("a small red circle at the top left")
    assert spec.attributes == ("count", "color", "shape", "size", "position")
    assert parse_caption("two red circles").attributes == ("count", "color", "shape")
    assert "relation" in parse_caption("a red circle above a blue square").attributes
    rel = CaptionSpec("relation", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), relation="left of")
    assert word_caption(rel) == "a red circle left of a blue square"
    assert word_caption(rel, style=1) == "a red circle to the left of a blue square"
    assert word_caption(rel, swap=True) == "a blue square right of a red circle"
    assert word_caption(parse_caption("a large red circle in the top left corner"), 0) == (
        "a large red circle at the top left"
    )
    for bad in ("a dog", "a red circle left of", "an orange square", ""):
        with pytest.raises(CaptionError):
            parse_caption(bad)


# ---------------------------------------------------------------------------------------------------------------
def _canvas(*objects: tuple[str, str, str, float, float], res: int = 32) -> torch.Tensor:
    cells = {0.18: 0, 0.5: 1, 0.82: 2}
    placed = tuple(Placed(c, s, z, 3 * cells[y] + cells[x], x, y) for c, s, z, x, y in objects)
    return render(Scene(placed, CaptionSpec("single", (ObjectSpec("red", "circle"),)), "", (0.1, 0.0, 0.0)), res)[0]


def test_detection_and_scoring_by_hand():
    img = _canvas(("red", "square", "large", 0.18, 0.18), ("blue", "circle", "small", 0.82, 0.5))
    dets = detect_objects(img[None])[0]
    assert [(d.color, d.shape, d.size, d.position) for d in dets] == [
        ("red", "square", "large", "top left"),
        ("blue", "circle", "small", "right"),
    ]
    ok = score_caption(parse_caption("a red square left of a blue circle"), dets)
    assert ok == {"count": True, "color": True, "shape": True, "relation": True}
    wrong = score_caption(parse_caption("a red square right of a blue circle"), dets)
    assert wrong == {"count": True, "color": True, "shape": True, "relation": False}
    assert score_caption(parse_caption("a red square above a blue circle"), dets)["relation"] is True
    assert score_caption(parse_caption("a red square below a blue circle"), dets)["relation"] is False
    single = score_caption(parse_caption("a small red square at the top left"), dets)
    assert single == {"count": False, "color": True, "shape": True, "size": False, "position": True}
    assert score_caption(parse_caption("two red squares"), dets)["color"] is False
    noisy = img.clone()
    noisy[:, 28, 2] = torch.tensor([1.0, -1.0, 1.0])  # one purple speck: below the size of any object
    assert len(detect_objects(noisy[None])[0]) == 2


def test_adherence_is_exact_on_real_images_and_near_chance_on_shuffled_captions():
    for split in ("train", "heldout"):
        ds = ShapesDataset(300, 32, split, seed=11)
        caps = [s.caption for s in ds.scenes]
        real = adherence(ds.x, caps)
        assert real["all_correct"] >= 0.99 and real["n"] == 300
        for attr in ("count", "color", "shape", "size", "position", "relation"):
            assert real[attr] >= 0.99, (split, attr, real)
        random.Random(0).shuffle(caps)
        shuffled = adherence(ds.x, caps)
        assert shuffled["all_correct"] <= 0.05 and shuffled["color"] <= 0.35 and shuffled["position"] <= 0.35
    with pytest.raises(ValueError, match="captions"):
        adherence(ds.x[:2], caps[:3])
