"""GroupNorm + SiLU alone, compiled, bf16, replayed from CUDA graphs (kernel time), on the CIFAR UNet's activation
shapes at batch 256: PyTorch's GroupNorm in NCHW and channels-last against sdeflow's channels-last ``GroupNorm``,
as Inductor compiles our PyTorch formulation and as our fused Triton operator; forward (sampling) and forward +
backward (training), in µs and GB/s of the least traffic.

    python benchmarks/speed_norm.py [--append]
    python benchmarks/speed_norm.py --sweep --out benchmarks/results/norm_sweep   # our kernels' launch settings

Writes ``speed_norm.{json,md}`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from timing import Bench, kernel_main, kernel_table, load_results, run_line, time_steps

CALLS = 10  # calls captured per CUDA graph


def in_graph(step: Callable[[], None], dev: torch.device) -> Callable[[], None]:
    """``CALLS`` calls of ``step`` replayed from one CUDA graph (after a warm-up on a side stream): the GPU time of
    the kernels alone, without the host's launch work, which at these sizes is as long as the kernels (kernels in a
    UNet's CUDA graph run like this). On the CPU: the calls themselves."""
    if dev.type != "cuda":
        return lambda: [step() for _ in range(CALLS)] and None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            step()
    return graph.replay


def norm_rows(bench: Bench) -> Iterator[dict]:
    """GroupNorm (32 groups) + SiLU, compiled, bf16 activations under autocast, on the CIFAR UNet's activation
    shapes at batch 256: PyTorch's GroupNorm in NCHW and channels-last against sdeflow's (channels-last only; on
    NCHW it is PyTorch's). Forward alone (sampling) and forward + backward (training). GB/s counts the least
    traffic: x read twice (statistics, normalisation) and y written forward; x, dy read and dx written backward."""
    from sdeflow.models.layers import GroupNorm, set_norm_backend

    dev = bench.device
    shapes = [(256, 256, 32, 32), (256, 512, 32, 32), (256, 256, 16, 16)] if not bench.smoke else [(4, 64, 8, 8)]
    cases = [("PyTorch", "NCHW"), ("PyTorch", "channels-last"), ("sdeflow (Inductor)", "channels-last"),
             ("sdeflow (Triton)", "channels-last")]  # fmt: skip
    for i, shape in enumerate(shapes):
        for impl, layout in cases:
            for train in (False, True) if i == 0 else (False,):
                torch._dynamo.reset()  # a fresh compilation per case (one code object, many shapes)
                set_norm_backend("auto" if "Triton" in impl else "torch")
                gn = (GroupNorm if "sdeflow" in impl else torch.nn.GroupNorm)(32, shape[1], eps=1e-6).to(dev)
                fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
                x = torch.randn(shape, device=dev, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_(train)
                dy = torch.randn_like(x)
                # bf16, as a conv takes it; sdeflow's GroupNorm takes its SiLU along
                if "sdeflow" in impl:
                    f = torch.compile(lambda v, m=gn: m(v, act=True).to(torch.bfloat16))
                else:
                    f = torch.compile(lambda v, m=gn: F.silu(m(v)).to(torch.bfloat16))
                inputs = (x, *gn.parameters())

                def step(f: Callable = f, inputs: tuple = inputs, dy: torch.Tensor = dy, train: bool = train) -> None:
                    with torch.autocast(dev.type, dtype=torch.bfloat16), torch.set_grad_enabled(train):
                        y = f(inputs[0])
                    if train:  # gradients returned, not accumulated into .grad (that would add traffic)
                        torch.autograd.grad(y, inputs, dy)

                m = time_steps(in_graph(step, dev), dev, 2, bench.n(20, 2), bench.n(3, 1))
                m["sec"] /= CALLS
                nbytes = x.numel() * x.element_size() * (6 if train else 3)
                yield {
                    "part": "norm",
                    "library": impl,
                    "variant": f"{layout}, {'forward + backward' if train else 'forward'}, {tuple(shape)}",
                    "shape": list(shape),
                    "layout": layout,
                    "pass": "forward + backward" if train else "forward",
                    "us": m["sec"] * 1e6,
                    "GB_per_s": nbytes / m["sec"] / 1e9,
                    "spread": m["spread"],
                }
    set_norm_backend("auto")


def sweep_rows(bench: Bench) -> Iterator[dict]:
    """Launch configurations of our Triton operator (registers or looped tiles, tile size, warps), uncompiled and
    replayed from CUDA graphs, bf16 under autocast as in the UNet, on the benchmark UNet's training shapes (batch
    128) and the sampling batch: the figures behind the defaults in ``sdeflow/models/kernels/group_norm.py``."""
    from sdeflow.models.kernels import group_norm as gnk
    from sdeflow.models.layers import set_norm_backend

    dev = bench.device
    defaults = gnk.ONE_PASS, gnk.REGISTER_TILE, gnk.LOOP_TILE, gnk.WARPS
    old_norms = set_norm_backend("triton" if dev.type == "cuda" else "torch")
    try:
        yield from _sweep(bench)
    finally:  # the library's own settings back, whatever happened
        gnk.ONE_PASS, gnk.REGISTER_TILE, gnk.LOOP_TILE, gnk.WARPS = defaults
        set_norm_backend(old_norms)


def _sweep(bench: Bench) -> Iterator[dict]:
    from sdeflow.models.kernels import group_norm as gnk
    from sdeflow.models.layers import GroupNorm

    dev = bench.device
    shapes = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8), (256, 256, 32, 32)]
    configs = [(True, t, w) for t in (4096, 8192, 16384, 32768) for w in (4, 8, 16)]
    configs += [(False, t, w) for t in (2048, 4096, 8192, 16384) for w in (4, 8)]
    for shape in shapes if not bench.smoke else [(4, 64, 8, 8)]:
        gn = GroupNorm(32, shape[1], eps=1e-6).to(dev)
        x = torch.randn(shape, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        dy = torch.randn_like(x)
        for one_pass, tile, warps in configs if not bench.smoke else configs[:2]:
            gnk.ONE_PASS, gnk.REGISTER_TILE, gnk.LOOP_TILE, gnk.WARPS = one_pass, tile, tile, warps
            if gnk._blocks(shape[1], 32, shape[2] * shape[3])["ONE_PASS"] != one_pass:  # type: ignore[index]
                continue
            for train in (False, True):

                def step(train: bool = train, gn: GroupNorm = gn, x: torch.Tensor = x, dy: torch.Tensor = dy) -> None:
                    with torch.autocast(dev.type, dtype=torch.bfloat16), torch.set_grad_enabled(train):
                        y = gn(x, act=True)
                    if train:
                        torch.autograd.grad(y, (x, gn.weight, gn.bias), dy)

                m = time_steps(in_graph(step, dev), dev, 2, bench.n(20, 2), bench.n(3, 1))
                m["sec"] /= CALLS
                nbytes = x.numel() * x.element_size() * (6 if train else 3)
                how = "registers" if one_pass else "looped"
                yield {
                    "part": "sweep",
                    "library": f"Triton, {how}, tile {tile}, {warps} warps",
                    "variant": f"{'forward + backward' if train else 'forward'}, {tuple(shape)}",
                    "shape": list(shape),
                    "layout": "channels-last",
                    "pass": "forward + backward" if train else "forward",
                    "us": m["sec"] * 1e6,
                    "GB_per_s": nbytes / m["sec"] / 1e9,
                    "spread": m["spread"],
                }


def write_report(out: Path) -> None:
    metas, rows = load_results(out, "speed_norm")
    m = metas.get("norm") or metas["sweep"]
    lines = [
        "# GroupNorm + SiLU, compiled, bf16, replayed from CUDA graphs (µs per call)",
        "",
        run_line(m),
        "",
        "GB/s counts the least traffic (forward: x read twice, y written; backward: x and dy read, dx written).",
        "",
        *kernel_table(rows, ("shape", "pass", "layout", "library")),
    ]
    (out / "speed_norm.md").write_text("\n".join(lines) + "\n")
    print((out / "speed_norm.md").read_text())


def main() -> None:
    kernel_main("speed_norm", __doc__, norm_rows, sweep_rows, write_report)


if __name__ == "__main__":
    main()
