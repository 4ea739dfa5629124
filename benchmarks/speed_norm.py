"""GroupNorm + SiLU alone, compiled, bf16, on the CIFAR UNet's activation shapes at batch 256: PyTorch's
GroupNorm in NCHW and channels-last against sdeflow's channels-last ``GroupNorm``; forward (sampling) and forward +
backward (training), in µs and GB/s of the least traffic.

    python benchmarks/speed_norm.py [--append]

Writes ``speed_norm.{json,md}`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from timing import Bench, load_results, run_line, start, time_steps


def norm_rows(bench: Bench) -> Iterator[dict]:
    """GroupNorm (32 groups) + SiLU, compiled, bf16 activations under autocast, on the CIFAR UNet's activation
    shapes at batch 256: PyTorch's GroupNorm in NCHW and channels-last against sdeflow's (channels-last only; on
    NCHW it is PyTorch's). Forward alone (sampling) and forward + backward (training). GB/s counts the least
    traffic: x read twice (statistics, normalisation) and y written forward; x, dy read and dx written backward."""
    from sdeflow.models.layers import GroupNorm

    dev = bench.device
    shapes = [(256, 256, 32, 32), (256, 512, 32, 32), (256, 256, 16, 16)] if not bench.smoke else [(4, 64, 8, 8)]
    cases = [("PyTorch", "NCHW"), ("PyTorch", "channels-last"), ("sdeflow", "channels-last")]
    for i, shape in enumerate(shapes):
        for impl, layout in cases:
            for train in (False, True) if i == 0 else (False,):
                torch._dynamo.reset()  # a fresh compilation per case (one code object, many shapes)
                gn = (GroupNorm if impl == "sdeflow" else torch.nn.GroupNorm)(32, shape[1], eps=1e-6).to(dev)
                fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
                x = torch.randn(shape, device=dev, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_(train)
                dy = torch.randn_like(x)
                f = torch.compile(lambda v, m=gn: F.silu(m(v)).to(torch.bfloat16))  # bf16, as a conv takes it
                inputs = (x, *gn.parameters())

                def step(f: Callable = f, inputs: tuple = inputs, dy: torch.Tensor = dy, train: bool = train) -> None:
                    with torch.autocast(dev.type, dtype=torch.bfloat16), torch.set_grad_enabled(train):
                        y = f(inputs[0])
                    if train:  # gradients returned, not accumulated into .grad (that would add traffic)
                        torch.autograd.grad(y, inputs, dy)

                m = time_steps(step, dev, 2, bench.n(20, 2), bench.n(3, 1))
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


def write_report(out: Path) -> None:
    metas, rows = load_results(out, "speed_norm")
    m = metas["norm"]
    lines = [
        "# GroupNorm + SiLU, compiled, bf16, batch 256 (µs per call)",
        "",
        run_line(m),
        "",
        "GB/s counts the least traffic (forward: x read twice, y written; backward: x and dy read, dx written).",
        "",
        "| shape | pass | layout | library | µs | GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| error: {r['error'][:160]} |" + " |" * 5)
            continue
        lines.append(
            f"| {tuple(r['shape'])} | {r['pass']} | {r['layout']} | {r['library']} | {r['us']:.0f} | "
            f"{r['GB_per_s']:.0f} |"
        )
    (out / "speed_norm.md").write_text("\n".join(lines) + "\n")
    print((out / "speed_norm.md").read_text())


def main() -> None:
    bench, args = start("speed_norm", __doc__)
    if bench is None:
        return write_report(Path(args.out))
    try:
        for r in norm_rows(bench):
            bench.add(r)
    except Exception as e:
        bench.add({"part": "norm", "library": "?", "variant": "?", "error": f"{type(e).__name__}: {e}"[:300]})
    write_report(bench.out)


if __name__ == "__main__":
    main()
