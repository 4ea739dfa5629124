"""Backbone forward+backward throughput on one GPU: sdeflow's UNet and DiT next to diffusers' at matched sizes.

For each model, precision (fp32 with TF32 matmuls, bf16 autocast, bf16 autocast + torch.compile) and library:
images/s of forward + MSE loss + backward (median of timed repeats, CUDA events), peak memory, and model FLOP
utilisation = (FLOPs of one forward+backward, counted by torch.utils.flop_counter) × steps/s over the measured
dense bf16 matrix-product peak of the same GPU.

Models: the DDPM++ CIFAR-10 UNet (EDM's configuration, 55.7 M) against diffusers' UNet2DModel with the same
structure (256-256-256 channels, 4 blocks per level, attention at 16×16: 59.0 M) on 32×32×3; DiT-S/2 and DiT-B/2
against diffusers' DiTTransformer2DModel with the same width/depth/heads/patch on 32×32×4 latents, 1000 classes.

    python benchmarks/model_throughput.py [--only unet,dit-s,dit-b] [--precisions fp32,bf16,bf16+compile]

Writes benchmarks/results/model_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from timing import count_flops, measured_bf16_peak, time_steps

BATCH = {"unet": 128, "dit-s": 256, "dit-b": 256}


def build(model: str, lib: str) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    """(module, input shape (C, H, W), num_classes)."""
    if lib == "sdeflow":
        from sdeflow.models import DiT, UNet

        if model == "unet":
            return UNet.preset("ddpmpp_cifar10", dropout=0.0), (3, 32, 32), 0
        name = {"dit-s": "DiT-S/2", "dit-b": "DiT-B/2"}[model]
        return DiT.preset(name, input_size=32, in_channels=4, num_classes=1000), (4, 32, 32), 1000
    import diffusers

    if model == "unet":
        m = diffusers.UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(256, 256, 256),
            layers_per_block=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
        return m, (3, 32, 32), 0
    heads = {"dit-s": 6, "dit-b": 12}[model]
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    return m, (4, 32, 32), 1000


def forward(m: torch.nn.Module, lib: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if lib == "sdeflow":
        return m(x, t, y)
    if y is None:
        return m(x, t).sample
    return m(x, timestep=t, class_labels=y).sample


def _autocast_forward(net, lib, x, t, y, amp: bool) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        return forward(net, lib, x, t, y).float()


def run_one(model: str, lib: str, precision: str, dev: torch.device, iters: int, reps: int) -> dict:
    torch.manual_seed(0)
    net, shape, ncls = build(model, lib)
    net = net.to(dev).train()
    params = sum(p.numel() for p in net.parameters())
    b = BATCH[model]
    x = torch.randn(b, *shape, device=dev)
    target = torch.randn_like(x)
    t = torch.rand(b, device=dev) * (1.0 if lib == "sdeflow" else 999.0)
    y = torch.randint(0, ncls, (b,), device=dev) if ncls else None
    amp = precision.startswith("bf16")
    fn = torch.compile(net) if precision.endswith("compile") else net

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = forward(fn, lib, x, t, y)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        for p in net.parameters():
            p.grad = None

    m = time_steps(step, dev, 3, iters, reps)  # the warm-up compiles
    flops = count_flops(lambda: _autocast_forward(net, lib, x, t, y, amp) - target)
    for p in net.parameters():
        p.grad = None
    sec = m["sec"]
    return {
        "model": model,
        "library": lib,
        "precision": precision,
        "batch": b,
        "params_M": round(params / 1e6, 2),
        "images_per_s": b / sec,
        "step_ms": sec * 1e3,
        "peak_mem_GiB": m["mem"],
        "flops_per_step": flops,
        "achieved_TFLOPs": flops / sec / 1e12,
        "warmup_s": round(m["warmup_s"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="unet,dit-s,dit-b")
    ap.add_argument("--precisions", default="fp32,bf16,bf16+compile")
    ap.add_argument("--libs", default="sdeflow,diffusers")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--append", action="store_true", help="merge into the existing results (re-run a subset)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = measured_bf16_peak(dev)
    print(f"measured dense bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s")
    import diffusers

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "bf16_peak_TFLOPs": peak / 1e12,
        "command": "python benchmarks/model_throughput.py",
    }
    rows: list[dict] = []
    previous = json.loads((out / "model_throughput.json").read_text())["rows"] if args.append else []
    for model in args.only.split(","):
        for precision in args.precisions.split(","):
            for lib in args.libs.split(","):
                try:
                    r = run_one(model, lib, precision, dev, args.iters, args.reps)
                except Exception as e:
                    r = {"model": model, "library": lib, "precision": precision, "error": f"{type(e).__name__}: {e}"}
                r["mfu"] = r.get("achieved_TFLOPs", 0) * 1e12 / peak
                rows.append(r)
                print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
                (out / "model_throughput.json").write_text(
                    json.dumps({"meta": meta, "rows": previous + rows}, indent=1)
                )
    new = {(r["model"], r["library"], r["precision"]) for r in rows}
    rows = [r for r in previous if (r["model"], r["library"], r["precision"]) not in new] + rows
    order = {m: i for i, m in enumerate(BATCH)}
    rows.sort(
        key=lambda r: (
            order.get(r["model"], 9),
            ["fp32", "bf16", "bf16+compile"].index(r["precision"])
            if r["precision"] in ("fp32", "bf16", "bf16+compile")
            else 9,
            r["library"] != "sdeflow",
        )
    )
    write_markdown(out, meta, rows)


def write_markdown(out: Path, meta: dict, rows: list[dict]) -> None:
    (out / "model_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Backbone forward+backward throughput",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['device']}, torch {meta['torch']}, diffusers "
        f"{meta['diffusers']}; measured dense bf16 matmul peak {meta['bf16_peak_TFLOPs']:.0f} TFLOP/s. MFU = "
        "counted FLOPs of forward+backward per second over that peak (for every precision).",
        "",
        "| model | precision | library | params (M) | batch | images/s | peak mem (GiB) | MFU | vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['library']} | | | error: {r['error'][:80]} | | | |")
            continue
        ref = next(
            (
                q
                for q in rows
                if q["model"] == r["model"]
                and q["precision"] == r["precision"]
                and q["library"] == "diffusers"
                and "error" not in q
            ),
            None,
        )
        ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}×" if ref and r["library"] == "sdeflow" else ""
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['library']} | {r['params_M']} | {r['batch']} | "
            f"{r['images_per_s']:.0f} | {r['peak_mem_GiB']:.1f} | {r['mfu']:.1%} | {ratio} |"
        )
    (out / "model_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
