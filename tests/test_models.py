"""Backbones: shapes, parameter counts, initialisation, conditioning, attention, and overfitting."""

import pytest
import torch

from sdeflow import Denoiser, EDMProcess, recipe
from sdeflow.models import MLP, DiT, UNet, attention, attention_reference, build_model

# Peebles & Xie 2023, Table 1 (parameters in millions; ImageNet 256², latents 32×32×4, 1000 classes)
DIT_PAPER = {"DiT-S/2": 33.0, "DiT-B/2": 130.0, "DiT-L/2": 458.0, "DiT-XL/2": 675.0}


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name, millions", DIT_PAPER.items())
def test_dit_parameter_counts_match_the_paper(name, millions):
    with torch.device("meta"):
        m = DiT.preset(name, input_size=32, in_channels=4, out_channels=8, num_classes=1000)
    assert abs(_count(m) / 1e6 - millions) / millions < 0.01, _count(m)


def test_ddpmpp_cifar10_preset_has_edm_size():
    with torch.device("meta"):
        m = UNet.preset("ddpmpp_cifar10")
    assert abs(_count(m) / 1e6 - 55.73) < 0.05  # EDM reports 55.73 M for DDPM++ on CIFAR-10


@pytest.mark.parametrize("name", [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)])
def test_dit_preset_shapes(name):
    with torch.device("meta"):  # shape inference without the compute of the large presets
        m = DiT.preset(name, input_size=32, in_channels=4, num_classes=10)
        out = m(torch.randn(2, 4, 32, 32), torch.randn(2), torch.tensor([0, -1]))
    assert out.shape == (2, 4, 32, 32)


@pytest.mark.parametrize(
    "name, res, ch",
    [("ddpmpp_cifar10", 32, 3), ("adm_cifar10", 32, 3), ("small", 8, 1), ("small", 28, 1), ("small_attn", 32, 3)],
)
def test_unet_preset_shapes(name, res, ch):
    m = UNet.preset(name, img_resolution=res, in_channels=ch, num_classes=10)
    out = m(torch.randn(2, ch, res, res), torch.randn(2), torch.tensor([3, -1]))
    assert out.shape == (2, ch, res, res)


def _tiny_models():
    return {
        "mlp": MLP(dim=2, width=32, depth=2, emb_channels=16, num_classes=3),
        "unet": UNet.preset("small_attn", img_resolution=8, in_channels=1, num_classes=3, model_channels=16),
        "dit": DiT(
            input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3, qk_norm=True
        ),
    }


def _input(kind, b=4):
    return torch.randn(b, 2) if kind == "mlp" else torch.randn(b, 1, 8, 8)


@pytest.mark.parametrize("kind", ["mlp", "unet", "dit"])
def test_untrained_output_is_exactly_zero(kind):
    m = _tiny_models()[kind]
    assert torch.count_nonzero(m(_input(kind), torch.randn(4), torch.tensor([0, 1, 2, -1]))) == 0


def _randomize(m):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kind", ["mlp", "unet", "dit"])
def test_conditioning_changes_output_and_null_label_is_honoured(kind):
    m = _randomize(_tiny_models()[kind]).eval()
    x, c = _input(kind), torch.full((4,), 0.3)
    y0, y1 = m(x, c, torch.zeros(4, dtype=torch.long)), m(x, c, torch.ones(4, dtype=torch.long))
    assert (y0 - y1).abs().max() > 1e-4
    torch.testing.assert_close(m(x, c, None), m(x, c, torch.full((4,), -1)))
    assert (m(x, c, None) - y0).abs().max() > 1e-4
    assert (
        m(x, c, torch.zeros(4, dtype=torch.long)) - m(x, torch.full((4,), 0.9), torch.zeros(4, dtype=torch.long))
    ).abs().max() > 1e-4  # the noise level matters too
    with pytest.raises(ValueError, match="class labels must lie"):
        m(x, c, torch.full((4,), 3))


def test_unet_attention_hands_the_fused_kernels_a_contiguous_head_dim(monkeypatch):
    """Heads cut from an NCHW feature map are strided along the head dimension; the fused SDPA kernels refuse
    such inputs (PyTorch falls back to the math path), so attention() copies them first, and only them."""
    import torch.nn.functional as F

    from sdeflow.models import UNet

    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    net = UNet.preset("small_attn", img_resolution=8, in_channels=1, model_channels=16).eval()
    x = torch.randn(2, 1, 8, 8)
    net(x, torch.ones(2))
    assert seen and all(s == (1, 1, 1) for s in seen)
    seen.clear()
    net.to(memory_format=torch.channels_last)
    net(x.contiguous(memory_format=torch.channels_last), torch.ones(2))
    assert seen and all(s == (1, 1, 1) for s in seen)
    q = torch.randn(2, 4, 16, 37).transpose(-1, -2)  # (B, heads, L=37, d=16), head dim strided
    torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 64, 6, 5), (2, 32, 8, 8), (2, 8, 4, 4)])
def test_channels_last_group_norm_matches_pytorch(shape):
    """sdeflow's GroupNorm on NHWC activations: per-channel statistics merged by the law of total variance give
    PyTorch's group normalisation (values and gradients), keep the layout, and leave NCHW inputs to PyTorch."""
    import torch.nn.functional as F

    from sdeflow.models.layers import GroupNorm

    g = torch.Generator().manual_seed(0)
    gn = GroupNorm(min(32, shape[1] // 2), shape[1], eps=1e-6)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(shape[1], generator=g))
        gn.bias.copy_(torch.randn(shape[1], generator=g))
    # channel means far apart within a group: the merge must not cancel
    x = torch.randn(shape, generator=g) * 3 + 20 * torch.randn(1, shape[1], 1, 1, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    dy = torch.randn(shape, generator=g)
    y = gn(x_cl)
    ref = F.group_norm(x_ref, gn.num_groups, gn.weight, gn.bias, gn.eps)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y, (x_cl, gn.weight, gn.bias), dy)
    grads_ref = torch.autograd.grad(ref, (x_ref, gn.weight, gn.bias), dy)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    # under bf16 autocast: computed in fp32 from the bf16 input, fp32 out (CUDA autocast's GroupNorm policy)
    xb = x_cl.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = gn(xb)
    assert yb.dtype == torch.float32
    torch.testing.assert_close(yb, F.group_norm(xb.float(), gn.num_groups, gn.weight, gn.bias, gn.eps))
    # NCHW: PyTorch's own kernel, bit for bit; and the state dict is nn.GroupNorm's
    assert torch.equal(gn(x), F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps))
    plain = torch.nn.GroupNorm(gn.num_groups, shape[1], eps=1e-6)
    plain.load_state_dict(gn.state_dict())


def test_channels_last_unet_matches_nchw():
    """The whole UNet in NHWC (the GPU fast path) computes what it computes in NCHW."""
    m = _randomize(_tiny_models()["unet"]).eval()
    x, c = _input("unet"), torch.randn(4)
    ref = m(x, c)
    m.to(memory_format=torch.channels_last)
    out = m(x.contiguous(memory_format=torch.channels_last), c)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_sdpa_matches_reference_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    # and inside a model: patch the reference in and compare the whole forward pass
    import sdeflow.models.dit as dit_mod

    m = _randomize(_tiny_models()["dit"]).eval()
    x, c = _input("dit"), torch.randn(4)
    fast = m(x, c)
    orig = dit_mod.attention
    dit_mod.attention = attention_reference
    try:
        slow = m(x, c)
    finally:
        dit_mod.attention = orig
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bf16_autocast_and_compile(kind):
    m = _randomize(_tiny_models()[kind]).eval()
    x, c = _input(kind), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, c)
    ref = m(x, c)
    assert torch.isfinite(y).all() and float((y.float() - ref).norm() / ref.norm()) < 0.05
    compiled = torch.compile(m, backend="eager", fullgraph=True)  # whole graph captured, no breaks
    torch.testing.assert_close(compiled(x, c), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_backbone_overfits_a_tiny_batch(kind):
    """EDM loss on a fixed batch with fixed (σ, ε): loss falls by 10× within a few hundred Adam steps."""
    torch.manual_seed(0)
    net = _tiny_models()[kind]
    den = Denoiser(net, EDMProcess(), "edm")
    r = recipe("edm")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1)
    sigma = r.sample_sigma(8, g)
    noise = torch.randn(8, 1, 8, 8, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    from sdeflow import denoising_loss

    losses = []
    for _ in range(300):
        loss = denoising_loss(den, x0, sigma, r.weight(sigma), noise=noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    print(kind, losses[0], losses[-1])
    assert losses[-1] < losses[0] / 10


def test_build_model_and_errors():
    assert isinstance(build_model("unet", preset="small", img_resolution=8, in_channels=1), UNet)
    assert isinstance(build_model("dit", preset="DiT-S/4", input_size=8, in_channels=1), DiT)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("vit")
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiT.preset("DiT-M/2")
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNet.preset("big")
    with pytest.raises(ValueError, match="UNet expects"):
        UNet.preset("small", img_resolution=8, in_channels=1)(torch.randn(2, 3, 8, 8), torch.randn(2))


def test_attention_backend_preference_is_reversible():
    from sdeflow.models.layers import set_attention_backend

    before = list(torch._C._get_sdp_priority_order())
    try:
        assert set_attention_backend("cudnn") == "cudnn"
        from torch.nn.attention import SDPBackend

        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        q = torch.randn(2, 3, 16, 8)
        # on the CPU the preference falls back to the usual kernels: same result
        torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q), rtol=1e-5, atol=1e-5)
    finally:
        assert set_attention_backend("default") == "default"
    assert list(torch._C._get_sdp_priority_order()) == before
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        set_attention_backend("fast")
