"""The markdown tables of the speed benchmarks (training and sampling): images/s, MFU, memory, ratio to diffusers."""

from __future__ import annotations

from timing import run_line

TITLES = {
    "train_unet": "Training loop, CIFAR-size UNet, 32×32×3, batch 128, bf16",
    "train_dit": "Training loop, DiT-B/2, 32×32×4, 1000 classes, batch 256, bf16",
    "sample_unet": "Sampling, CIFAR-size UNet, DDIM, NFE 20, batch 256 (images/s incl. copy to host)",
}


def speed_tables(metas: dict, rows: list[dict], title: str) -> str:
    """One table per part: each row's images/s, time, MFU, memory and its ratio to the reference diffusers row."""
    lines = [f"# {title}", ""]
    best = sorted({r["part"] for r in rows if r["part"].startswith("sample_best_b")}, key=lambda p: -int(p[13:]))
    titles = TITLES | {p: f"Sampling, each library at its best, CIFAR-size UNet, DDIM, NFE 20, batch {p[13:]}"
                       for p in best}  # fmt: skip
    for part, title in titles.items():
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        m = metas[part]
        lines += [f"## {title}", "", run_line(m), ""]
        if m.get("note"):
            lines += [m["note"], ""]
        train = part.startswith("train")
        ref_variant = "train_unconditional.py" if part == "train_unet" else ("eager" if train else "bf16, eager")
        ref_variant = "compile" if part in best else ref_variant
        ref = next(
            (r for r in sel if r["library"] == "diffusers" and ref_variant in r["variant"] and "error" not in r), None
        )
        lines += [
            "| library | variant | params (M) | images/s | "
            + ("step ms | MFU | " if train else "s/batch | MFU | ")
            + "peak mem (GiB) | MiB / image | vs diffusers "
            + (ref["variant"] if ref else "")
            + " | vs the fastest diffusers row |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        peers = [r["images_per_s"] for r in sel if r["library"] == "diffusers" and "error" not in r]
        for r in sel:
            if "error" in r:
                lines.append(f"| {r['library']} | {r['variant']} | error: {r['error'][:120]} |" + " |" * 7)
                continue
            ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}×" if ref else ""
            best_ratio = f"{r['images_per_s'] / max(peers):.2f}×" if peers else ""
            if r.get("date", m["date"]) != m["date"]:
                r = r | {"variant": f"{r['variant']} *(earlier run, {r['date']})*"}
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
            per_image = f"{r['peak_mem_GiB'] * 1024 / r['batch']:.1f}" if r.get("batch") else ""
            mid = f"{r['step_ms']:.1f} | {mfu} | " if train else f"{r['seconds_per_batch']:.4f} | {mfu} | "
            lines.append(
                f"| {r['library']} | {r['variant']} | {r['params_M']} | {r['images_per_s']:.0f} | {mid}"
                f"{r['peak_mem_GiB']:.1f} | {per_image} | {ratio} | {best_ratio} |"
            )
        floors = [r for r in sel if "wall_over_kernels" in r]
        if floors:
            lines += ["", "Latency against its floor (the summed GPU kernel time of a run, from the profiler):", ""]
            lines += [f"- {r['library']} {r['variant']}: {r['seconds_per_batch'] * 1e3:.1f} ms a batch, "
                      f"{r['profile']['kernel_ms_per_step']:.1f} ms of kernels, wall ÷ kernels "
                      f"{r['wall_over_kernels']:.2f}" for r in floors]  # fmt: skip
        lines.append("")
    return "\n".join(lines)
