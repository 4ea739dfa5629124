"""The DiT's adaLN alone (gated residual + LayerNorm + modulation), bf16 under autocast, replayed from CUDA graphs
(kernel time), at DiT-B/2 and DiT-XL/2's training shapes (batch 256, 256 tokens, an fp32 residual stream):
PyTorch's operators eager, as Inductor compiles them, and sdeflow's fused Triton operator; the block's first norm
(no residual) and its second (residual, then norm); forward (sampling) and forward + backward (training), in µs
and GB/s of the least traffic.

    python benchmarks/speed_adaln.py [--append]
    python benchmarks/speed_adaln.py --sweep --out benchmarks/results/adaln_sweep   # our kernels' launch settings

Writes ``speed_adaln.{json,md}`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from speed_norm import CALLS, in_graph
from timing import Bench, kernel_main, kernel_table, load_results, run_line, time_steps

IMPLS = ("PyTorch eager", "Inductor (compiled PyTorch operators)", "sdeflow (Triton)")


def _case(shape: tuple[int, int, int], residual: bool, dev: torch.device, seed: int = 0) -> tuple[list, list]:
    """Leaves (x, mod (B, 6D), branch) and upstream gradients (dy, du) in a DiT's dtypes under bf16 autocast: the
    residual stream fp32 (as in Peebles & Xie's code, the positional embedding is fp32), the branch (a linear
    layer's output) and the modulation bf16; y bf16 (it feeds a linear layer), u fp32."""
    g = torch.Generator(dev).manual_seed(seed)
    b, n, d = shape

    def randn(*s: int, dtype: torch.dtype = torch.bfloat16, grad: bool = True) -> torch.Tensor:
        return torch.randn(*s, device=dev, generator=g, dtype=dtype).requires_grad_(grad)

    leaves = [randn(b, n, d, dtype=torch.float32), randn(b, 6 * d)] + ([randn(b, n, d)] if residual else [])
    grads = [randn(b, n, d, grad=False)] + ([randn(b, n, d, dtype=torch.float32, grad=False)] if residual else [])
    return leaves, grads


def _step(impl: str, shape: tuple, residual: bool, train: bool, dev: torch.device) -> tuple[Callable, int]:
    """One call of the norm (and its backward) as a closure, and the least bytes it must move."""
    from sdeflow.models.layers import AdaLayerNorm, set_norm_backend

    d = shape[-1]
    set_norm_backend("auto" if "Triton" in impl else "torch")
    norm = AdaLayerNorm(d).to(dev)
    leaves, grads = _case(shape, residual, dev)

    def call(x: torch.Tensor, mod: torch.Tensor, *p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sh, sc, g = mod[:, :d], mod[:, d : 2 * d], mod[:, 2 * d : 3 * d]
        return norm.residual(x, p[0], g, sh, sc) if p else (norm(x, sh, sc),)

    f = torch.compile(call) if impl.startswith("Inductor") else call

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16), torch.set_grad_enabled(train):
            out = f(*leaves)
        if train:  # gradients returned, not accumulated into .grad (that would add traffic)
            outs = out[::-1] if residual else out  # (y, u)
            torch.autograd.grad(outs, leaves, grads)

    bf16 = leaves[0].numel() * 2  # bytes of one (B, N, D) activation in bf16; the stream and its gradients are fp32
    passes = (6 if residual else 3) + ((9 if residual else 5) if train else 0)  # forward, backward reads + writes
    return step, passes * bf16


def adaln_rows(bench: Bench) -> Iterator[dict]:
    from sdeflow.models.layers import set_norm_backend

    dev = bench.device
    shapes = [(256, 256, 768), (256, 256, 1152)] if not bench.smoke else [(2, 16, 64)]
    try:
        for shape in shapes:
            for residual in (False, True):
                for train in (False, True):
                    for impl in IMPLS:
                        torch._dynamo.reset()
                        step, nbytes = _step(impl, shape, residual, train, dev)
                        yield _timed(bench, step, nbytes, impl, shape, residual, train)
    finally:
        set_norm_backend("auto")


def _timed(bench: Bench, step: Callable, nbytes: int, impl: str, shape: tuple, residual: bool, train: bool) -> dict:
    m = time_steps(in_graph(step, bench.device), bench.device, 2, bench.n(20, 2), bench.n(3, 1))
    sec = m["sec"] / CALLS
    which = "residual + norm" if residual else "norm"
    passes = "forward + backward" if train else "forward"
    return {
        "part": "adaln",
        "library": impl,
        "variant": f"{which}, {passes}, {tuple(shape)}",
        "shape": list(shape),
        "op": which,
        "pass": passes,
        "us": sec * 1e6,
        "GB_per_s": nbytes / sec / 1e9,
        "spread": m["spread"],
    }


def sweep_rows(bench: Bench) -> Iterator[dict]:
    """Launch settings of our operator (rows a step, tokens a program, warps), uncompiled, from CUDA graphs, at
    DiT-B/2's training shape: the figures behind the defaults in ``sdeflow/models/kernels/adaln.py``."""
    from sdeflow.models.kernels import adaln
    from sdeflow.models.layers import set_norm_backend

    defaults = adaln.ROWS, adaln.TOKENS, adaln.WARPS
    shape = (256, 256, 768) if not bench.smoke else (2, 16, 64)
    configs = [(r, t, w) for r in (1, 2, 4, 8) for t in (16, 64, 256) for w in (4, 8) if t >= r]
    try:
        for rows, tokens, warps in configs if not bench.smoke else configs[:2]:
            adaln.ROWS, adaln.TOKENS, adaln.WARPS = rows, tokens, warps
            for residual in (False, True):
                for train in (False, True):
                    step, nbytes = _step("sdeflow (Triton)", shape, residual, train, bench.device)
                    row = _timed(bench, step, nbytes, f"{rows} rows, {tokens} tokens, {warps} warps", shape,
                                 residual, train)  # fmt: skip
                    yield row | {"part": "sweep"}
    finally:
        adaln.ROWS, adaln.TOKENS, adaln.WARPS = defaults
        set_norm_backend("auto")


def write_report(out: Path) -> None:
    metas, rows = load_results(out, "speed_adaln")
    m = metas.get("adaln") or metas["sweep"]
    lines = [
        "# adaLN (gated residual + LayerNorm + modulation), bf16, replayed from CUDA graphs (µs per call)",
        "",
        run_line(m),
        "",
        "Dtypes as in a DiT under bf16 autocast: the residual stream x, u and their gradients fp32; p, the",
        "modulation, y and dy bf16. GB/s counts the least traffic, in bf16 activations of (B, N, D) (fp32 counts",
        "two): norm forward 3 (x read, y written), residual + norm forward 6 (x, p read; u, y written); norm",
        "backward 5 (x, dy read; dx written), residual + norm backward 9 (x, p, dy, du read; dx, dp written).",
        "",
        *kernel_table(rows, ("shape", "op", "pass", "library")),
    ]
    (out / "speed_adaln.md").write_text("\n".join(lines) + "\n")
    print((out / "speed_adaln.md").read_text())


def main() -> None:
    kernel_main("speed_adaln", __doc__, adaln_rows, sweep_rows, write_report)


if __name__ == "__main__":
    main()
