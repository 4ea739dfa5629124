"""ControlNet: an untrained ControlNet leaves the base's output bitwise unchanged (zero convolutions), the base stays
frozen while the copy trains, residuals of several ControlNets add with their scales, guidance keeps the control
images in both branches; and the control maps against what the captioned shapes were drawn from."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdeflow.core.condition import ControlCondition, TextCondition, cat_conditions, null_condition
from sdeflow.data.captions import COLORS
from sdeflow.data.control import (
    center_heatmap,
    color_segmentation,
    control_map,
    edge_map,
    load_control_images,
    segmentation_map,
)
from sdeflow.data.shapes import ShapesDataset
from sdeflow.models import UNet
from sdeflow.models.controlnet import ControlledNet, ControlNet


def _base(**kw):
    torch.manual_seed(0)
    net = UNet(img_resolution=16, in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(8,), dropout=0.0, **kw)  # fmt: skip
    with torch.no_grad():  # the last convolution starts at zero: random weights so that every change shows
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval().requires_grad_(False)


def _randomise_zero_convs(cn, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*cn.zero_skips, cn.zero_middle, cn.hint[-1]]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["labels", "text"])
def test_untrained_controlnet_changes_nothing_bit_for_bit(kind):
    kw = {"num_classes": 4} if kind == "labels" else {"context_dim": 8}
    base = _base(**kw)
    x, c = torch.randn(3, 3, 16, 16), torch.tensor([0.1, -0.4, 0.7])
    cond = torch.tensor([0, 3, -1]) if kind == "labels" else TextCondition(torch.randn(3, 2, 8),
                                                                          torch.ones(3, 2, dtype=torch.bool),
                                                                          torch.randn(3, 8))  # fmt: skip
    y0 = base(x, c, cond)
    assert torch.equal(base(x, c, cond, ([torch.zeros(1)] * 4, torch.zeros(1))), y0)  # zero residuals: no change
    net = ControlledNet(base, [ControlNet(base, control_channels=2)])
    image = torch.rand(3, 2, 16, 16)
    assert torch.equal(net(x, c, ControlCondition(cond, (image,))), y0)
    assert torch.equal(net(x, c, cond), y0)  # no control images: the base alone
    # the copy starts from the base's weights
    cn = net.controlnets[0]
    assert all(
        torch.equal(cn.copy.state_dict()[k], v) for k, v in base.state_dict().items() if k in cn.copy.state_dict()
    )


def test_the_base_stays_frozen_while_the_controlnet_trains():
    base = _base(num_classes=4)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cn = ControlNet(base, control_channels=1)
    net = ControlledNet(base, [cn])
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in cn.parameters()}
    x, c, y, img = torch.randn(4, 3, 16, 16), torch.rand(4), torch.tensor([0, 1, 2, 3]), torch.rand(4, 1, 16, 16)
    for _ in range(3):
        loss = net(x, c, ControlCondition(y, (img,))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert cn.zero_middle.weight.abs().sum() > 0 and cn.hint[-1].weight.abs().sum() > 0  # the zero layers learned
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base: bitwise unchanged
    assert all(p.grad is None for p in base.parameters())


def test_several_controlnets_add_their_scaled_residuals():
    base = _base()
    a, b = ControlNet(base, control_channels=1), ControlNet(base, control_channels=7)
    _randomise_zero_convs(a, seed=1)
    _randomise_zero_convs(b, seed=2)
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.5])
    ia, ib = torch.rand(2, 1, 16, 16), torch.rand(2, 7, 16, 16)
    sa, ma = a(x, c, None, ia)
    sb, mb = b(x, c, None, ib)
    want = base(x, c, None, ([0.7 * p + 0.3 * q for p, q in zip(sa, sb)], 0.7 * ma + 0.3 * mb))
    got = ControlledNet(base, [a, b], [0.7, 0.3])(x, c, ControlCondition(None, (ia, ib)))
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - base(x, c)).abs().max() > 1e-3
    only_a = ControlledNet(base, [a, b], [1.0, 0.0])(x, c, ControlCondition(None, (ia, ib)))
    assert torch.equal(only_a, ControlledNet(base, [a])(x, c, ControlCondition(None, (ia,))))
    with pytest.raises(ValueError, match="1 control images for 2 ControlNets"):
        ControlledNet(base, [a, b])(x, c, ControlCondition(None, (ia,)))
    with pytest.raises(ValueError, match=r"control image must be \(B, 1, H, W\)"):
        a(x, c, None, ib)
    with pytest.raises(ValueError, match="2 conditioning scales for 1 ControlNets"):
        ControlledNet(base, [a], [1.0, 2.0])


def test_guidance_keeps_the_control_images_in_both_branches():
    img = torch.rand(2, 1, 4, 4)
    cc = ControlCondition(torch.tensor([1, 2]), (img,))
    null = null_condition(cc, None, 2)
    assert torch.equal(null.cond, torch.tensor([-1, -1])) and null.images[0] is img
    both = cat_conditions(cc, null)
    assert torch.equal(both.cond, torch.tensor([1, 2, -1, -1])) and torch.equal(both.images[0], torch.cat([img, img]))
    with pytest.raises(ValueError, match="takes control images only"):
        null_condition(ControlCondition(None, (img,)), None, 2)


def test_control_maps_by_hand_and_against_the_shapes_ground_truth(tmp_path):
    square = -torch.ones(1, 3, 10, 10)
    square[:, :, 3:7, 3:7] = 1.0  # a white square on black
    edges = edge_map(square)[0, 0]
    want = torch.zeros(10, 10)
    want[2:8, 2:8] = 1
    want[4:6, 4:6] = 0  # Sobel responds on both sides of the boundary, not inside or outside
    assert torch.equal(edges, want)
    ramp = -torch.ones(1, 1, 6, 6)
    ramp[..., 3:] = -0.6  # a step of 0.2 on [0, 1]: a Sobel response of 0.2, under the threshold 0.25
    assert edge_map(ramp).sum() == 0 and edge_map(ramp, threshold=0.15).sum() == 12
    ds = ShapesDataset(12, resolution=32, seed=3)
    for i in range(12):
        seg = color_segmentation(ds.x[i : i + 1])[0]
        truth = torch.full((32, 32), -1)
        for k, obj in enumerate(ds.scenes[i].objects):
            truth[ds.masks(i)[k]] = list(COLORS).index(obj.color)
        assert (seg == truth).float().mean() > 0.99  # antialiased rims aside, the drawn objects
        heat = center_heatmap(ds.x[i : i + 1])[0, 0]
        for k in range(len(ds.scenes[i].objects)):
            ys, xs = torch.nonzero(ds.masks(i)[k], as_tuple=True)
            cy, cx = round(float(ys.float().mean())), round(float(xs.float().mean()))
            assert heat[cy, cx] > 0.75  # a peak within a pixel of each object's centre
    one_hot = segmentation_map(ds.x[:2])
    assert one_hot.shape == (2, len(COLORS), 32, 32) and set(one_hot.sum(1).unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(control_map("mask", ds.x[:2]), one_hot)
    with pytest.raises(ValueError, match="unknown control kind 'depth'"):
        control_map("depth", ds.x[:1])
    # a control image of another size: resized (nearest) with a warning
    Image.fromarray((edges.numpy() * 255).astype(np.uint8)).save(tmp_path / "e.png")
    with pytest.warns(UserWarning, match=r"is 10×10, resized to 20×20"):
        loaded = load_control_images(tmp_path / "e.png", 20, 1)
    assert loaded.shape == (1, 1, 20, 20) and torch.equal(loaded[0, 0, ::2, ::2], edges)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(load_control_images(tmp_path, 10, 1)[0, 0], edges)  # a folder; the right size: silent
    with pytest.raises(FileNotFoundError, match="control image .* not found"):
        load_control_images(tmp_path / "none.png", 10, 1)


# --- through the loop and the CLI --------------------------------------------------------------------------------


def test_controlnet_run_trains_the_copy_only_and_samples_under_control(tmp_path, capsys):
    from sdeflow.checkpoint import find_latest
    from sdeflow.cli import main
    from sdeflow.config import ConfigError, load_config
    from sdeflow.training import Trainer

    common = ["data.name=shapes", "data.resolution=16", "data.num_samples=32", "train.batch_size=8",
              "train.tensorboard=false", "sample.n=4", "sample.steps=2", "model.kind=unet", "model.preset=null",
              "train.ema.decay=0.5", "model.kwargs={model_channels: 16, channel_mult: [1, 2], num_blocks: 1, "
              "attn_resolutions: []}"]  # fmt: skip
    Trainer(load_config(None, [*common, "train.steps=2", "train.ckpt_every=2", f"out_dir={tmp_path / 'base'}"]),
            progress=False).fit()  # fmt: skip
    base = find_latest(tmp_path / "base" / "checkpoints")
    cfg = load_config(None, [*common, "train.steps=3", "train.ckpt_every=3", "finetune.method=controlnet",
                             f"finetune.base={base}", "train.lr=1e-2", f"out_dir={tmp_path / 'cn'}"])  # fmt: skip
    t = Trainer(cfg, progress=False)
    net = t.objective.net
    start = {k: v.clone() for k, v in net.state_dict().items()}
    t.fit()
    end = net.state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith("base."))  # the base: frozen
    assert not torch.equal(start["controlnets.0.zero_middle.weight"], end["controlnets.0.zero_middle.weight"])
    run = find_latest(tmp_path / "cn" / "checkpoints")
    ds = ShapesDataset(2, resolution=16)
    for i in range(2):  # colour masks as control images: the dataset's own renderings
        Image.fromarray(((ds.x[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(
            tmp_path / f"c{i}.png"
        )
    capsys.readouterr()
    common_args = ["--n", "4", "--steps", "3", "--sampler", "euler"]
    assert main(["sample", str(base), *common_args, "--out", str(tmp_path / "s_base")]) == 0
    for scale, out in (("0", "s0"), ("1", "s1")):
        assert main(["sample", str(run), *common_args, "--control", str(tmp_path), "--control-scale", scale,
                     "--out", str(tmp_path / out)]) == 0  # fmt: skip
    x = {o: np.load(tmp_path / o / "samples.npz")["x"] for o in ("s_base", "s0", "s1")}
    assert np.array_equal(x["s0"], x["s_base"])  # scale 0: the base alone, bit for bit
    assert np.abs(x["s1"] - x["s_base"]).max() > 1e-4
    assert main(["sample", str(run), "--n", "2"]) == 2
    assert "give its control image(s) with --control" in capsys.readouterr().err
    assert main(["sample", str(base), "--n", "2", "--control", str(tmp_path)]) == 2
    with pytest.raises(ConfigError, match="finetune.method 'controlnet' adapts a trained model"):
        load_config(None, [*common, "finetune.method=controlnet"])
    with pytest.raises(ConfigError, match="finetune.control must be one of"):
        load_config(None, [*common, "finetune.control=depth"])


def test_dit_controlnet_starts_as_identity_and_adds_one_residual_per_block():
    from sdeflow.models import DiT
    from sdeflow.models.controlnet import DiTControlNet

    torch.manual_seed(0)
    base = DiT(input_size=8, in_channels=3, hidden_size=32, depth=3, num_heads=2, patch_size=2, num_classes=3)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base.eval().requires_grad_(False)
    x, c, y, img = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.9]), torch.tensor([2, -1]), torch.rand(2, 1, 8, 8)
    y0 = base(x, c, y)
    cn = DiTControlNet(base, control_channels=1, blocks=2)
    assert len(cn.copy.blocks) == 2 and len(cn.zero_out) == 2
    assert torch.equal(ControlledNet(base, [cn])(x, c, ControlCondition(y, (img,))), y0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in (cn.hint, *cn.zero_out):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
    res, middle = cn(x, c, y, img)
    assert middle is None and len(res) == 2
    # by hand: the base's blocks with residual i added after block i
    h, t = base.embed(x, c)
    t = t + base.y_emb(y, 2, x.device)
    for i, blk in enumerate(base.blocks):
        h = blk(h, t) + (0.5 * res[i] if i < 2 else 0)
    want = base.unpatchify(h, t)
    got = ControlledNet(base, [cn], [0.5])(x, c, ControlCondition(y, (img,)))
    assert torch.allclose(got, want, atol=1e-6) and (got - y0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="does not fit a DiT of depth 3"):
        DiTControlNet(base, 1, blocks=4)


def test_control_acts_only_inside_its_sigma_interval():
    from sdeflow.sampling.guidance import ControlInterval

    def den(x, sigma, cond):  # marks whether the control images reached the network
        return x + (100.0 if isinstance(cond, ControlCondition) else 0.0)

    d = ControlInterval(den, (1.0, 5.0))
    x = torch.zeros(3, 1, 2, 2)
    cc = ControlCondition(torch.tensor([0, 1, 2]), (torch.rand(3, 1, 2, 2),))
    assert torch.all(d(x, torch.tensor(3.0), cc) == 100) and torch.all(d(x, torch.tensor(0.5), cc) == 0)
    assert torch.all(d(x, torch.tensor(5.0), cc) == 100)  # the ends belong to the interval
    mixed = d(x, torch.tensor([0.5, 2.0, 7.0]), cc)
    assert mixed[:, 0, 0, 0].tolist() == [0.0, 100.0, 0.0]
    assert torch.all(d(x, torch.tensor(3.0), torch.tensor([0, 1, 2])) == 0)  # no control condition: untouched
    with pytest.raises(ValueError, match="σ_lo < σ_hi"):
        ControlInterval(den, (5.0, 1.0))


def test_mmdit_controlnet_carries_the_text_stream_and_starts_as_identity():
    from sdeflow.models import MMDiT
    from sdeflow.models.controlnet import DiTControlNet

    torch.manual_seed(0)
    base = MMDiT(context_dim=8, pooled_dim=8, input_size=8, in_channels=3, hidden_size=32, depth=3, num_heads=2,
                 patch_size=2)  # fmt: skip
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base.eval().requires_grad_(False)
    text = TextCondition(torch.randn(2, 4, 8), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
                         torch.randn(2, 8))  # fmt: skip
    x, c, img = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.9]), torch.rand(2, 1, 8, 8)
    y0 = base(x, c, text)
    cn = DiTControlNet(base, control_channels=1, blocks=2)
    net = ControlledNet(base, [cn])
    assert torch.equal(net(x, c, ControlCondition(text, (img,))), y0)
    with torch.no_grad():
        for layer in (cn.hint, *cn.zero_out):
            layer.weight.normal_(0, 0.1)
    res, _ = cn(x, c, text, img)
    h, t, carry = base.start(x, c, text)
    for i, blk in enumerate(base.blocks):  # by hand: residual i after block i; the text stream as in the base
        h, carry = base.step(blk, h, t, carry)
        h = h + (res[i] if i < 2 else 0)
    assert torch.allclose(net(x, c, ControlCondition(text, (img,))), base.unpatchify(h, t), atol=1e-6)
    other = TextCondition(text.tokens.flip(0), text.mask.flip(0), text.pooled.flip(0))
    assert not torch.allclose(cn(x, c, other, img)[0][1], res[1])  # the copy reads the prompt too
