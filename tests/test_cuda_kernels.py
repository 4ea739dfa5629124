"""Our Triton kernels compiled for the GPU (the CPU tests run them in Triton's interpreter): the fused GroupNorm and
adaLN operators against PyTorch's operators in fp32, under torch.compile and inside CUDA graphs, and in whole models.

Skipped where no GPU is present, as in CI: ``python -m pytest tests/test_cuda_kernels.py`` on a GPU machine.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_group_norm_compiled_on_gpu(backend):
    """The NHWC GroupNorm on the GPU, as Inductor compiles our PyTorch formulation (``torch``) and as our fused
    Triton operator (``triton``, the default on CUDA): forward and gradients against PyTorch's GroupNorm in fp32,
    eager and compiled, in fp32 and under bf16 autocast (where the Triton operator writes bf16)."""
    import torch.nn.functional as F

    from sdeflow.models.layers import GroupNorm, set_norm_backend

    old = set_norm_backend(backend)
    try:
        _check_group_norm(GroupNorm, F, triton=backend == "triton")
    finally:
        set_norm_backend(old)


def _check_group_norm(GroupNorm, F, triton: bool) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    gn = GroupNorm(32, 256, eps=1e-6).cuda()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(8, 256, 16, 16, device="cuda") * 2 + 5 * torch.randn(1, 256, 1, 1, device="cuda")
    dy = torch.randn_like(x)
    ref_in = x.clone().requires_grad_(True)
    ref = F.group_norm(ref_in, 32, gn.weight, gn.bias, 1e-6)
    ref_grads = torch.autograd.grad(ref, (ref_in, gn.weight, gn.bias), dy)
    compiled = torch.compile(lambda v: gn(v))
    tol = 1e-4
    for fn in (gn, compiled):
        for dtype in (torch.float32, torch.bfloat16):
            xin = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = fn(xin)
            bf16_out = triton and dtype == torch.bfloat16
            assert y.dtype == (torch.bfloat16 if bf16_out else torch.float32)
            assert y.is_contiguous(memory_format=torch.channels_last)
            grads = torch.autograd.grad(y, (xin, gn.weight, gn.bias), dy)
            if dtype == torch.bfloat16:  # the bf16 input rounding (2⁻⁸ relative to |x| ≈ 5–10) bounds the error
                ref_b = F.group_norm(x.bfloat16().float(), 32, gn.weight, gn.bias, 1e-6)
                tol_b = (2**-8, 1e-2) if bf16_out else (1e-4, 1e-4)  # bf16 output: its own rounding too
                torch.testing.assert_close(y.float(), ref_b, rtol=tol_b[0], atol=tol_b[1])
                assert float((grads[0].float() - ref_grads[0]).abs().max()) < 0.05 * float(ref_grads[0].abs().max())
                continue
            torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
            for a, b in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("pre,mod,act", [(True, False, True), (False, True, True), (False, False, False)])
def test_triton_group_norm_act_on_gpu(pre, mod, act):
    """The fused operator compiled for the GPU, with the UNet's neighbours (additive embedding, scale-shift, SiLU):
    values and every gradient against PyTorch's operators in fp32; the same kernel under torch.compile (fullgraph)
    and inside a CUDA graph gives the same bits as eager."""
    from helpers import group_norm_act_reference
    from sdeflow.models.kernels import group_norm_act

    g = torch.Generator(device="cuda").manual_seed(0)
    n, c, h, w = 8, 256, 16, 16
    x = (torch.randn(n, c, h, w, device="cuda", generator=g) * 2 + 4).contiguous(memory_format=torch.channels_last)
    weight, bias = 1 + 0.3 * torch.randn(c, device="cuda", generator=g), torch.randn(c, device="cuda", generator=g)
    extra = {}
    if pre:
        extra["pre"] = torch.randn(n, c, device="cuda", generator=g)
    if mod:
        extra |= {
            "scale": 0.5 * torch.randn(n, c, device="cuda", generator=g),
            "shift": torch.randn(n, c, device="cuda"),
        }
    leaves = [t.requires_grad_() for t in (x, weight, bias, *extra.values())]
    y = group_norm_act(x, 32, weight, bias, 1e-6, act=act, **extra)
    ref = group_norm_act_reference(x, 32, weight, bias, 1e-6, act=act, **extra)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, device="cuda", generator=g)
    for a, b in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    compiled = torch.compile(lambda v: group_norm_act(v, 32, weight, bias, 1e-6, act=act, **extra), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), y.detach())
        graph, static = torch.cuda.CUDAGraph(), x.detach().clone(memory_format=torch.channels_last)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = group_norm_act(static, 32, weight, bias, 1e-6, act=act, **extra)
        static.copy_(x.detach() * 0.5)
        graph.replay()
        assert torch.equal(out, group_norm_act(x.detach() * 0.5, 32, weight, bias, 1e-6, act=act, **extra))


@pytest.mark.parametrize("branch", [False, True])
def test_triton_ada_layer_norm_on_gpu(branch):
    """The fused adaLN operator compiled for the GPU at a DiT width (768 channels in rows of 1024 lanes, 300 tokens:
    a partial last program): values and every gradient against PyTorch's operators in fp64; under torch.compile
    (fullgraph) and inside a CUDA graph the same bits as eager; bf16 within bf16's rounding."""
    from sdeflow.models.kernels import ada_layer_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, d = 4, 300, 768
    x = torch.randn(b, n, d, device="cuda", generator=g) * 2 + 1
    mod = 0.5 * torch.randn(b, 6 * d, device="cuda", generator=g)
    p = torch.randn(b, n, d, device="cuda", generator=g) if branch else None
    leaves = [t.requires_grad_() for t in (x, mod, *([p] if branch else []))]
    sh, sc, gate = mod[:, :d], mod[:, d : 2 * d], (mod[:, 2 * d : 3 * d] if branch else None)
    u, y = ada_layer_norm(x, sh, sc, 1e-6, p, gate)
    ur = x.double() + (gate.double()[:, None] * p.double() if branch else 0)
    yr = torch.nn.functional.layer_norm(ur, (d,), eps=1e-6) * (1 + sc.double()[:, None]) + sh.double()[:, None]
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=2e-5)
    dy, du = torch.randn(y.shape, device="cuda", generator=g), torch.randn(y.shape, device="cuda", generator=g)
    outs, refs, grads = ([y, u], [yr, ur], [dy, du]) if branch else ([y], [yr], [dy])
    got = torch.autograd.grad(outs, leaves, grads)
    want = torch.autograd.grad(refs, leaves, [v.double() for v in grads])
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    args = [v.detach() for v in (x, sh, sc)] + ([p.detach(), gate.detach()] if branch else [None, None])
    compiled = torch.compile(lambda *a: ada_layer_norm(a[0], a[1], a[2], 1e-6, a[3], a[4]), fullgraph=True)
    assert torch.equal(compiled(*args)[1], y.detach())
    graph, static = torch.cuda.CUDAGraph(), args[0].clone()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = ada_layer_norm(static, *args[1:3], 1e-6, *args[3:])[1]
    static.copy_(args[0] * 0.5)
    graph.replay()
    assert torch.equal(out, ada_layer_norm(args[0] * 0.5, *args[1:3], 1e-6, *args[3:])[1])
    xb, pb = args[0].bfloat16(), (args[3].bfloat16() if branch else None)
    ub, yb = ada_layer_norm(xb, *args[1:3], 1e-6, pb, args[4], out_dtype=torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and ub.dtype == (torch.float32 if branch else torch.bfloat16)
    yr_b = (
        torch.nn.functional.layer_norm(ub.double(), (d,), eps=1e-6) * (1 + sc.double()[:, None]) + sh.double()[:, None]
    )
    torch.testing.assert_close(yb.double(), yr_b, rtol=2**-8, atol=2e-2)


@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_compiled_transformers_with_fused_norms_on_gpu(kind):
    """A small DiT / MM-DiT compiled, bf16 autocast, forward and every parameter's gradient: with our adaLN
    operator (norm backend auto, the kernels seen by the profiler) against Inductor's compile of PyTorch's
    operators (torch), within bf16's rounding."""
    from sdeflow.core.condition import TextCondition
    from sdeflow.models import DiT, MMDiT
    from sdeflow.models.layers import set_norm_backend

    torch.manual_seed(0)
    common = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2)
    if kind == "dit":
        net, cond = DiT(num_classes=3, **common).cuda(), torch.tensor([0, 2, 1, 1], device="cuda")
    else:
        net = MMDiT(context_dim=32, pooled_dim=16, **common).cuda()
        mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 7, [1] * 5 + [0] * 2], device="cuda").bool()
        cond = TextCondition(torch.randn(4, 7, 32, device="cuda"), mask, torch.randn(4, 16, device="cuda"))
    for p in net.parameters():  # zero-initialised modulation and output layers would hide the blocks' gradients
        p.data.add_(0.05 * torch.randn_like(p))
    x, c = torch.randn(4, 4, 16, 16, device="cuda"), torch.tensor([0.1, -0.4, 1.0, 2.0], device="cuda")
    results = {}
    for backend in ("auto", "torch"):
        old = set_norm_backend(backend)
        try:
            torch._dynamo.reset()
            net.zero_grad()
            f = torch.compile(net)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = f(x, c, cond)
                y.float().square().sum().backward()
                torch.cuda.synchronize()
            ours = any("ada_layer_norm" in e.key for e in prof.key_averages())
            results[backend] = (y.float(), {n: p.grad.clone() for n, p in net.named_parameters()}, ours)
        finally:
            set_norm_backend(old)
    (y, grads, ours), (y_ref, grads_ref, theirs) = results["auto"], results["torch"]
    assert ours and not theirs
    torch.testing.assert_close(y, y_ref, rtol=0, atol=3e-2 * float(y_ref.abs().max()))
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=3e-2 * float(g.abs().max()) + 1e-6, msg=name)


def test_dit_training_with_fused_norms_on_gpu(tmp_path):
    """Compiled bf16 training steps of a small DiT through the Trainer, with our adaLN operator (norm backend auto:
    the profiler sees its kernels) and with Inductor's compile of PyTorch's operators (torch): the same first loss
    to bf16 rounding and close losses after. The profile is taken before the second run, which sets the process-wide
    backend to torch (a traced graph is guarded on it and would recompile)."""
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    def run(backend):
        cfg = load_config(None, [
            f"out_dir={tmp_path / backend}", "data.name=digits", "data.resolution=16", "model.kind=dit",
            "model.preset=DiT-S/2", "model.num_classes=10", "train.steps=8", "train.batch_size=32",
            "train.ckpt_every=0", "train.tensorboard=false", "train.compile=true", "train.precision=bf16",
            f"train.norm_backend={backend}", "train.lr=1e-4", "sample.n=4", "sample.steps=4",
        ])  # fmt: skip
        tr = Trainer(cfg, progress=False)
        tr.fit()
        return tr

    fused = run("auto")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fused.train_step()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any("ada_layer_norm_forward" in k for k in names) and any("ada_layer_norm_backward" in k for k in names)
    inductor = run("torch")
    a, b = torch.tensor(fused.losses), torch.tensor(inductor.losses)
    torch.testing.assert_close(a[0], b[0], rtol=1e-2, atol=0)
    torch.testing.assert_close(a, b, rtol=3e-2, atol=1e-3, msg=lambda m: f"{m}\nfused {a.tolist()}\ntorch {b.tolist()}")
