"""The fused adaLN operator (sdeflow::ada_layer_norm: gated residual + LayerNorm + modulation) against PyTorch's
own operators: values and every gradient, on the CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1
where there is no GPU; test_cuda runs it compiled)."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from sdeflow.core.condition import TextCondition  # noqa: E402
from sdeflow.models import DiT, MMDiT  # noqa: E402
from sdeflow.models.kernels import ada_layer_norm, interpreted  # noqa: E402
from sdeflow.models.kernels import adaln as ada_module  # noqa: E402
from sdeflow.models.layers import AdaLayerNorm, set_norm_backend  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreted(), reason="Triton imported for the GPU: test_cuda runs the kernels")


def reference(x, shift, scale, branch=None, gate=None, eps=1e-6):
    """(u, y): u = x + g·p, y = LN(u)·(1 + s) + t from F.layer_norm in fp64."""
    u = x.double() if branch is None else x.double() + gate.double()[:, None] * branch.double()
    y = F.layer_norm(u, (x.shape[-1],), eps=eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    return u, y


def _inputs(b, n, d, branch, seed=0, mean=0.5, chunks=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, d, generator=g) * 2 + mean).requires_grad_()
    if chunks:  # (B, 6D) regression output cut into views of row stride 6D, as the DiT block does
        mod = torch.randn(b, 6 * d, generator=g).mul(0.5).requires_grad_()
        shift, scale, gate = mod[:, :d], mod[:, d : 2 * d], mod[:, 2 * d : 3 * d]
        leaves = {"x": x, "mod": mod}
    else:  # separate tensors of different strides: the operator takes contiguous copies
        shift = torch.randn(b, d, generator=g).requires_grad_()
        scale = torch.randn(d, b, generator=g).mul(0.5).t().requires_grad_()  # column-major: row stride 1
        gate = torch.randn(b, d, generator=g).requires_grad_()
        leaves = {"x": x, "shift": shift, "scale": scale, "gate": gate}
    p = None
    if branch:
        p = torch.randn(b, n, d, generator=g).requires_grad_()
        leaves["branch"] = p
    else:
        leaves.pop("gate", None)
    return x, shift, scale, p, (gate if branch else None), leaves


@pytest.mark.parametrize(
    "shape,branch,chunks,tokens",
    [
        ((2, 7, 24), False, True, 64),  # 24 channels in rows of 32 lanes; 7 tokens: a partial last step of 4
        ((2, 7, 24), True, True, 64),
        ((3, 19, 40), True, True, 8),  # three programs a sample (8, 8, 3 tokens): partial sums added across them
        ((2, 12, 48), True, False, 4),  # modulation of mixed strides; three programs a sample
        ((1, 5, 64), False, False, 4),
    ],
)
def test_ada_layer_norm_equals_pytorch_with_every_gradient(shape, branch, chunks, tokens, monkeypatch):
    monkeypatch.setattr(ada_module, "TOKENS", tokens)
    x, shift, scale, p, g, leaves = _inputs(*shape, branch, chunks=chunks)
    u, y = ada_layer_norm(x, shift, scale, 1e-6, p, g)
    ur, yr = reference(x, shift, scale, p, g)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=1e-5)
    torch.testing.assert_close(u.double(), ur, rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    dy, du = torch.randn(y.shape, generator=gen), torch.randn(y.shape, generator=gen)
    outs, refs = ([y, u], [yr, ur]) if branch else ([y], [yr])
    got = torch.autograd.grad(outs, list(leaves.values()), [dy, du][: len(outs)])
    want = torch.autograd.grad(refs, list(leaves.values()), [dy.double(), du.double()][: len(outs)])
    for name, a, b in zip(leaves, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"d{name}")  # both of the leaf's dtype


def test_hand_computed_gated_residual_and_modulation():
    """One token: x = 1, p = (−1, 1, 3, 5), g = 1: u = (0, 2, 4, 6), μ = 3, σ² = 5, x̂ = (u − 3)/√5; s = 1, t = 0.5:
    y = 2x̂ + 0.5. Backward with dy = 1 and du_out = 1: dŷ = 2 everywhere is a constant, which LayerNorm's gradient
    removes (its mean is subtracted and Σ_d x̂ = 0), so dx = du_out = 1, dp = g·dx = 1, dg = Σ_n dx·p = p,
    dt = Σ_n dy = 1, ds = Σ_n dy·x̂ = x̂."""
    x = torch.ones(1, 1, 4, requires_grad=True)
    p = torch.tensor([[[-1.0, 1.0, 3.0, 5.0]]], requires_grad=True)
    g, s, t = (torch.full((1, 4), v, requires_grad=True) for v in (1.0, 1.0, 0.5))
    u, y = ada_layer_norm(x, t, s, 1e-6, p, g)
    xh = (torch.tensor([[0.0, 2.0, 4.0, 6.0]]) - 3) / (5 + 1e-6) ** 0.5
    torch.testing.assert_close(u, torch.tensor([[[0.0, 2.0, 4.0, 6.0]]]), rtol=0, atol=0)
    torch.testing.assert_close(y[0], 2 * xh + 0.5, rtol=0, atol=1e-6)
    dx, dp, dg, dt, ds = torch.autograd.grad([y, u], [x, p, g, t, s], [torch.ones_like(y), torch.ones_like(u)])
    one = torch.ones(1, 4)
    for name, got, want in (("dx", dx[0], one), ("dp", dp[0], one), ("dg", dg, p[0].detach()), ("dt", dt, one),
                            ("ds", ds, xh)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
    (ds,) = torch.autograd.grad(ada_layer_norm(x, t, s, 1e-6, p, g)[1], [s], xh.view(1, 1, 4))
    torch.testing.assert_close(ds, xh * xh, rtol=0, atol=1e-5)  # ds = Σ_n dy·x̂ with dy = x̂


def test_bf16_stream_is_rounded_before_the_statistics():
    """u is stored in bf16; y is the normalisation of that stored u (not of the fp32 sum), so the backward's
    recomputed u is the forward's. u is the fp32 x + g·p rounded once to bf16 (to nearest on a GPU; Triton's
    interpreter truncates): within one bf16 ulp, 2⁻⁷ relative."""
    x, shift, scale, p, g, _ = _inputs(2, 9, 32, True, mean=4.0)
    xb, pb, gb = x.detach().bfloat16(), p.detach().bfloat16(), g.detach().bfloat16()
    shift, scale = shift.detach(), scale.detach()
    u, y = ada_layer_norm(xb, shift, scale, 1e-6, pb, gb, out_dtype=torch.float32)
    assert u.dtype == torch.bfloat16 and y.dtype == torch.float32
    exact = xb.float() + gb.float()[:, None] * pb.float()
    torch.testing.assert_close(u.float(), exact, rtol=2**-7, atol=0)
    torch.testing.assert_close(y.double(), reference(u.float(), shift, scale)[1], rtol=0, atol=1e-5)
    assert (y.double() - reference(exact, shift, scale)[1]).abs().max() > 1e-3  # the rounding shows in y


def test_statistics_hold_for_a_large_mean():
    """Mean 1000, std 1: the variance is taken from deviations held in registers, not E[u²] − E[u]²."""
    x, shift, scale, *_ = _inputs(2, 8, 64, False, mean=1000.0)
    x = (x.detach().double() - 1000) / 2 + 1000
    _, y = ada_layer_norm(x.float(), shift.detach(), scale.detach())
    _, yr = reference(x, shift.detach(), scale.detach())
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=2e-3)


def test_operator_registrations_pass_opcheck():
    x, shift, scale, p, g, _ = _inputs(2, 6, 24, True)
    mod = [v.detach().clone().requires_grad_() for v in (shift, scale, g)]
    torch.library.opcheck(torch.ops.sdeflow.ada_layer_norm.default, (x, mod[0], mod[1], p, mod[2], 1e-6, torch.float32))
    torch.library.opcheck(
        torch.ops.sdeflow.ada_layer_norm.default, (x, mod[0], mod[1], None, None, 1e-6, torch.float32)
    )


def test_traces_into_one_graph_with_its_backward():
    old = set_norm_backend("triton")
    try:
        norm = AdaLayerNorm(24)
        x, shift, scale, p, g, leaves = _inputs(2, 5, 24, True)
        f = torch.compile(lambda *a: norm.residual(*a), fullgraph=True, backend="aot_eager")
        got, want = f(x, p, g, shift, scale), norm.residual(x, p, g, shift, scale)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        ga = torch.autograd.grad(got[1].square().sum() + got[0].sum(), list(leaves.values()))
        gb = torch.autograd.grad(want[1].square().sum() + want[0].sum(), list(leaves.values()))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        set_norm_backend(old)


@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_transformers_with_fused_norms_equal_pytorch_norms(kind):
    """A whole DiT / MM-DiT (every block's two norms, the gated residual, the final layer), forward and every
    parameter's gradient: the Triton path against PyTorch's."""
    torch.manual_seed(0)
    common = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
    if kind == "dit":
        net, cond = DiT(num_classes=3, **common), torch.tensor([0, 2])
    else:
        net = MMDiT(context_dim=16, pooled_dim=8, **common)
        mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]).bool()
        cond = TextCondition(tokens=torch.randn(2, 5, 16), mask=mask, pooled=torch.randn(2, 8))
    for p in net.parameters():  # zero-initialised modulation and output layers would hide the blocks' gradients
        p.data.add_(0.05 * torch.randn_like(p))
    x, c = torch.randn(2, 4, 8, 8), torch.tensor([0.1, -0.4])
    outs = []
    for backend in ("torch", "triton"):
        old = set_norm_backend(backend)
        try:
            net.zero_grad()
            y = net(x, c, cond)
            y.square().sum().backward()
            outs.append((y.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
        finally:
            set_norm_backend(old)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    assert outs[1][1].keys() == outs[0][1].keys() and any("ada" in n for n in outs[0][1])
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_refusals_and_fallbacks(monkeypatch):
    x, shift, scale, p, g, _ = _inputs(2, 4, 16, True)
    with pytest.raises(ValueError, match="branch and gate come together"):
        ada_layer_norm(x, shift, scale, branch=p)
    for kw, match in (
        ({"shift": shift[:1]}, r"shift must have shape \(2, 16\), got \(1, 16\)"),
        ({"scale": scale[:, :8]}, r"scale must have shape \(2, 16\)"),
        ({"branch": p[:, :2], "gate": g}, r"branch must have shape \(2, 4, 16\)"),
        ({"branch": p, "gate": g[:, :3]}, r"gate must have shape \(2, 16\)"),
    ):
        args = {"shift": shift, "scale": scale} | kw
        with pytest.raises(ValueError, match=match):
            ada_layer_norm(x, **args)
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\)"):
        ada_layer_norm(x[0], shift, scale)
    norm = AdaLayerNorm(16)
    assert not norm._fused(x)  # auto: CUDA tensors only
    old = set_norm_backend("triton")
    try:
        assert norm._fused(x) and not norm._fused(x[0])
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor, no interpreter: PyTorch's operators
        assert not norm._fused(x)
        with pytest.raises(RuntimeError, match="adaLN kernels take CUDA tensors"):
            ada_layer_norm(x, shift, scale)
    finally:
        set_norm_backend(old)
    torch.testing.assert_close(norm(x, shift, scale), reference(x, shift, scale)[1].float(), rtol=0, atol=1e-5)


def test_autocast_output_dtype():
    """Under autocast the fused operator writes y in the autocast dtype whatever the stream's (the linear layer that
    reads it would cast to it); PyTorch's path gives fp32 (LayerNorm runs in fp32 under autocast): the same values
    within bf16's rounding. The stream u keeps its own dtype (fp32 here); PyTorch rounds g·p to bf16 before adding
    it, the kernel does not: u within that rounding."""
    x, shift, scale, p, g, _ = _inputs(2, 6, 32, True)
    norm = AdaLayerNorm(32)
    outs = {}
    for backend in ("torch", "triton"):
        old = set_norm_backend(backend)
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                outs[backend] = norm.residual(x, p.bfloat16(), g.bfloat16(), shift.bfloat16(), scale.bfloat16())
        finally:
            set_norm_backend(old)
    (u_t, y_t), (u_f, y_f) = outs["torch"], outs["triton"]
    assert y_f.dtype == torch.bfloat16 and y_t.dtype == torch.float32 and u_f.dtype == u_t.dtype == torch.float32
    torch.testing.assert_close(u_f, u_t, rtol=0, atol=2**-8 * float((g[:, None] * p).detach().abs().max()))
    torch.testing.assert_close(y_f.float(), y_t, rtol=2**-7, atol=1e-2)
