"""Our Triton kernels (sdeflow.models.kernels) against PyTorch's own operators: values and every gradient, on the
CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU; test_cuda runs them compiled)."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from helpers import group_norm_act_reference  # noqa: E402
from sdeflow.models import UNet  # noqa: E402
from sdeflow.models.kernels import group_norm as gn_module  # noqa: E402
from sdeflow.models.kernels import (  # noqa: E402
    group_norm_act,
    interpreted,
    supported,
)
from sdeflow.models.layers import GroupNorm, set_norm_backend  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreted(), reason="Triton imported for the GPU: test_cuda runs the kernels")
CL = torch.channels_last


def _inputs(n, c, h, w, pre, mod, mean=3.0, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * std + mean).to(memory_format=CL).requires_grad_()
    extra = {}
    if pre:
        extra["pre"] = torch.randn(n, c, generator=g).requires_grad_()
    if mod:
        extra["scale"] = torch.randn(n, c, generator=g).mul(0.5).requires_grad_()
        extra["shift"] = torch.randn(n, c, generator=g).requires_grad_()
    weight = (1 + 0.3 * torch.randn(c, generator=g)).requires_grad_()
    bias = (0.2 * torch.randn(c, generator=g)).requires_grad_()
    return x, weight, bias, extra


@pytest.mark.parametrize(
    "shape,groups,pre,mod,act",
    [
        ((2, 64, 5, 7), 16, True, False, True),  # 35 positions: a partial last tile
        ((3, 128, 8, 8), 32, False, True, True),  # two programs per sample (64 channels each)
        ((2, 32, 4, 4), 8, False, False, False),  # plain group norm
        ((2, 64, 6, 6), 16, True, True, True),  # everything at once
        ((1, 256, 3, 3), 2, False, True, False),  # 128 channels per group: two groups per program
        ((2, 16, 9, 9), 4, True, True, True),  # 81 positions: a tile of 128 rows, 47 masked
    ],
)
@pytest.mark.parametrize("tiles", ["registers", "looped"])
def test_group_norm_act_equals_pytorch_with_every_gradient(shape, groups, pre, mod, act, tiles, monkeypatch):
    """Both kernel shapes: a sample's block held in registers (one pass), and tiles of 4 positions looped over (as
    activations of 32×32 and larger are)."""
    if tiles == "looped":
        monkeypatch.setattr(gn_module, "ONE_PASS", False)
        monkeypatch.setattr(gn_module, "LOOP_TILE", 256)  # 64 channels × 4 positions
    else:
        monkeypatch.setattr(gn_module, "REGISTER_TILE", 1 << 20)
    assert gn_module._blocks(shape[1], groups, shape[2] * shape[3])["ONE_PASS"] == (tiles == "registers")
    x, weight, bias, extra = _inputs(*shape, pre, mod)
    y = group_norm_act(x, groups, weight, bias, 1e-6, act=act, **extra)
    ref = group_norm_act_reference(x, groups, weight, bias, 1e-6, act=act, **extra)
    assert y.is_contiguous(memory_format=CL) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    leaves = [x, weight, bias, *extra.values()]
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(ref, leaves, dy)
    for name, a, b in zip(["x", "weight", "bias", *extra], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("one_pass", [True, False])
def test_group_norm_statistics_hold_for_a_large_mean(one_pass, monkeypatch):
    """Mean 1000, std 1: E[x²] − E[x]² in fp32 would lose the variance (ε·10⁶ ≈ 0.06 against 1); the kernel takes
    deviations from the mean held in registers, or (looping over tiles) centres its sums on each channel's first
    value."""
    monkeypatch.setattr(gn_module, "ONE_PASS", one_pass)
    monkeypatch.setattr(gn_module, "REGISTER_TILE", 1 << 20)
    x, weight, bias, _ = _inputs(2, 32, 16, 16, False, False, mean=1000.0, std=1.0)
    y = group_norm_act(x.detach().double().float(), 8, weight, bias, 1e-6, act=False)
    ref = F.group_norm(x.detach().double(), 8, weight.detach().double(), bias.detach().double(), 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)


def test_hand_computed_group_norm_silu():
    """One sample, one group of two channels at two positions: x = [[0, 2], [4, 6]] (positions × channels), so
    μ = 3, σ² = 5; with γ = (1, 2), β = (0, 1), pre = 0, scale = 1, shift = (0.5, 0): z = 2·(x̂·γ + β) + shift."""
    x = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).reshape(1, 2, 1, 2).permute(0, 3, 2, 1)  # (N, C, H, W) = (1, 2, 1, 2)
    x = x.contiguous(memory_format=CL)
    xhat = (x - 3.0) / (5.0 + 1e-6) ** 0.5
    z = 2 * (xhat * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1) + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
    z = z + torch.tensor([0.5, 0.0]).view(1, 2, 1, 1)
    y = group_norm_act(
        x, 1, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), 1e-6,
        scale=torch.ones(1, 2), shift=torch.tensor([[0.5, 0.0]]), act=True,
    )  # fmt: skip
    torch.testing.assert_close(y, z * torch.sigmoid(z), rtol=0, atol=1e-6)


def test_operator_registration_passes_opcheck():
    """Fake (meta) functions, autograd registration and schema as torch.compile and CUDA graphs need them."""
    x, weight, bias, extra = _inputs(2, 32, 4, 4, True, True)
    args = (x, weight, bias, extra["pre"], extra["scale"], extra["shift"], 8, 1e-6, True, torch.float32)
    torch.library.opcheck(torch.ops.sdeflow.group_norm_act.default, args)


def test_unet_with_fused_norms_equals_pytorch_norms():
    """A whole UNet (additive and scale-shift blocks, attention, output norm), forward and backward, channels-last:
    the Triton path (set_norm_backend('triton')) against PyTorch's."""
    for scale_shift in (False, True):
        torch.manual_seed(0)
        net = UNet(
            img_resolution=8, in_channels=3, model_channels=32, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(4,), dropout=0.0, scale_shift=scale_shift,
        ).to(memory_format=CL)  # fmt: skip
        for p in net.parameters():  # zero-initialised output convolutions would hide the blocks' gradients
            p.data.add_(0.02 * torch.randn_like(p))
        x = torch.randn(2, 3, 8, 8).to(memory_format=CL)
        c = torch.tensor([0.1, -0.4])
        outs = []
        for backend in ("torch", "triton"):
            old = set_norm_backend(backend)
            try:
                net.zero_grad()
                y = net(x, c)
                y.square().sum().backward()
                outs.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
            finally:
                set_norm_backend(old)
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
        for a, b in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_backend_choice_and_fallbacks():
    norm = GroupNorm(32, 96)  # 3 channels a group: not a power of two → PyTorch's path
    x = torch.randn(2, 96, 4, 4).to(memory_format=CL)
    assert not supported(x, 32) and supported(torch.randn(2, 64, 4, 4).to(memory_format=CL), 16)
    assert not supported(torch.randn(2, 64, 4, 4), 16)  # NCHW
    old = set_norm_backend("triton")
    try:
        assert not norm._fused(x)
        sliced = torch.randn(2, 96, 4, 4).to(memory_format=CL)[:, :64]  # 64 channels, but not a dense NHWC block
        assert not GroupNorm(16, 64)._fused(sliced)
        torch.testing.assert_close(norm(x, act=True), F.silu(F.group_norm(x, 32, norm.weight, norm.bias, norm.eps)))
        assert GroupNorm(16, 64)._fused(torch.randn(2, 64, 4, 4).to(memory_format=CL))
        assert not GroupNorm(16, 64, affine=False)._fused(torch.randn(2, 64, 4, 4).to(memory_format=CL))
        set_norm_backend("auto")  # auto: CUDA tensors only
        assert not GroupNorm(16, 64)._fused(torch.randn(2, 64, 4, 4).to(memory_format=CL))
    finally:
        set_norm_backend(old)
    with pytest.raises(ValueError, match="unknown norm backend 'fast'"):
        set_norm_backend("fast")
    y = torch.randn(2, 64, 4, 4).to(memory_format=CL)
    for bad, match in (
        ({"pre": torch.zeros(2, 64, 1, 1)}, r"pre must have shape \(2, 64\), got \(2, 64, 1, 1\)"),
        ({"scale": torch.zeros(64), "shift": torch.zeros(2, 64)}, r"scale must have shape \(2, 64\)"),
        ({"scale": torch.zeros(2, 64), "shift": torch.zeros(2, 32)}, r"shift must have shape \(2, 64\)"),
    ):
        with pytest.raises(ValueError, match=match):
            group_norm_act(y, 16, torch.ones(64), torch.zeros(64), 1e-6, **bad)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        group_norm_act(y, 16, torch.ones(32), torch.zeros(64), 1e-6)
    for backend in ("torch", "triton"):  # the module refuses it on either path
        set_norm_backend(backend)
        with pytest.raises(ValueError, match="GroupNorm: scale and shift come together"):
            GroupNorm(16, 64)(y, scale=torch.zeros(2, 64))
    set_norm_backend(old)
    with pytest.raises(ValueError, match="scale and shift come together"):
        group_norm_act(
            x[:, :64].contiguous(memory_format=CL), 16, torch.ones(64), torch.zeros(64), 1e-6, scale=torch.ones(2, 64)
        )


def test_fused_group_norm_traces_into_one_graph_with_its_backward():
    """torch.compile(fullgraph=True) through GroupNorm's dispatch and the operator's fake and autograd registrations
    (aot_eager: the tracing without Inductor's code generation), equal to eager with gradients."""
    old = set_norm_backend("triton")
    try:
        norm = GroupNorm(8, 32)
        x = torch.randn(2, 32, 4, 4).to(memory_format=CL).requires_grad_()
        pre = torch.randn(2, 32, requires_grad=True)
        f = torch.compile(lambda v, p: norm(v, pre=p, act=True), fullgraph=True, backend="aot_eager")
        y, want = f(x, pre), norm(x, pre=pre, act=True)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        got = torch.autograd.grad(y.square().sum(), (x, pre, norm.weight))
        ref = torch.autograd.grad(want.square().sum(), (x, pre, norm.weight))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        set_norm_backend(old)


def test_norm_backend_follows_the_config_and_cpu_tensors_need_the_interpreter(monkeypatch):
    from sdeflow.config_train import TrainConfig
    from sdeflow.models import layers
    from sdeflow.training.runtime import Runtime

    old = set_norm_backend("auto")
    try:
        Runtime.start(TrainConfig(device="cpu", norm_backend="torch"))
        assert layers._NORM_BACKEND == "torch"
        set_norm_backend("triton")
        x = torch.randn(2, 64, 4, 4).to(memory_format=CL)
        assert GroupNorm(16, 64)._fused(x)
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor, no interpreter: PyTorch's operators
        assert not GroupNorm(16, 64)._fused(x)
    finally:
        set_norm_backend(old)
