"""Training throughput on 1 and 2 GPUs (torchrun, NCCL): DDP for the CIFAR-size UNet and DiT-B/2, DDP and FSDP2
for DiT-B/2 and DiT-XL/2; images/s, MFU, peak memory per GPU, and the all-reduce time of the gradients.

Each row is a fresh ``torchrun --standalone --nproc_per_node N`` of this script (``--worker``), which trains with
sdeflow's ``Trainer`` (bf16, compiled, channels-last UNet, fused AdamW, EMA) at a fixed batch per GPU on the real
MNIST digits (32×32×3 for the UNet, 32×32×4 for the DiTs: the latent shape of 256-px images), times whole steps
and reports rank 0's figures. Scaling efficiency = images/s on N GPUs ÷ (N × images/s on 1).

    python benchmarks/scaling.py [--gpus 1,2] [--rows unet:ddp,...,dit-xl:fsdp,dit-xl:fsdp:ckpt]

``:ckpt`` adds activation checkpointing to a row (its speed cost and memory saving).

Writes ``scaling.{json,md}`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import mnist_npz
from timing import RESULTS, count_flops, measured_bf16_peak

ROWS = "unet:ddp,dit-b:ddp,dit-b:fsdp,dit-xl:ddp,dit-xl:fsdp,dit-xl:fsdp:ckpt"
MODELS = {  # per-GPU batch; the UNet is speed_train.py's DDPM++ (55.7 M)
    "unet": (["model.kind=unet", "model.preset=ddpmpp_cifar10", "model.kwargs={dropout: 0.0}"], 3, 128),
    "dit-b": (["model.kind=dit", "model.preset=DiT-B/2", "model.num_classes=1000"], 4, 256),
    "dit-xl": (["model.kind=dit", "model.preset=DiT-XL/2", "model.num_classes=1000"], 4, 128),
}
SMOKE = {"unet": ["model.kwargs={model_channels: 16, channel_mult: [1, 2], num_blocks: 1}"],
         "dit-b": ["model.preset=DiT-S/8"], "dit-xl": ["model.preset=DiT-S/8"]}  # fmt: skip


def worker(a: argparse.Namespace) -> None:
    """One row on this torchrun's ranks: time ``--steps`` training steps after ``--warmup``; rank 0 writes JSON."""
    import torch.distributed as dist

    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    model, channels, batch = MODELS[a.model]
    batch = 4 if a.smoke else batch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tmp = Path(tempfile.mkdtemp())
    npz = mnist_npz(tmp / "data.npz", channels, a.smoke)
    unet = a.model == "unet"
    cfg = load_config(None, [
        f"out_dir={tmp / 'run'}", "data.name=npz", f"data.path={npz}", *model, *(SMOKE[a.model] if a.smoke else []),
        "diffusion.recipe=ddpm", "train.steps=1000000", f"train.batch_size={batch * world}", "train.lr=1e-4",
        "train.ema={kind: fixed, decay: 0.9999}", "train.precision=bf16", f"train.compile={str(not a.smoke).lower()}",
        f"train.channels_last={str(unet).lower()}", f"train.parallel.strategy={a.strategy}", "train.ckpt_every=0",
        "train.tensorboard=false", f"train.activation_checkpointing={str(a.checkpointing).lower()}",
    ])  # fmt: skip
    tr = Trainer(cfg, progress=False)
    dev = tr.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    net = tr.objective.net
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(2, *tr.data_shape, device=dev)
    t = torch.rand(2, device=dev) * 999
    y = None if unet else torch.randint(0, 1000, (2,), device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):  # forward and backward of 2 images, uncompiled
        flops = count_flops(lambda: net(x, t, y)) // 2 * batch * world
    net.zero_grad(set_to_none=True)
    for _ in range(a.warmup):
        tr.train_step()
    sync()
    torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
    times = []
    for _ in range(a.reps):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            tr.train_step()
        sync()
        times.append((time.perf_counter() - t0) / a.steps)
    step = sorted(times)[len(times) // 2]
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0, device=dev)
    allreduce = None
    if dist.is_initialized() and world > 1:  # the gradients' all-reduce alone: fp32, one flat buffer
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        buf = torch.zeros(params, device=dev)
        for _ in range(3):
            dist.all_reduce(buf)
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buf)
        sync()
        allreduce = (time.perf_counter() - t0) / 10
    if tr.rank == 0:
        bf16_peak = measured_bf16_peak(dev)
        row = {"model": a.model, "strategy": a.strategy, "activation_checkpointing": a.checkpointing,
               "gpus": world, "params_M": round(params / 1e6, 1), "batch_per_gpu": batch,
               "images_per_s": batch * world / step, "step_ms": step * 1e3,
               "spread": (max(times) - min(times)) / step, "mfu": flops / step / (bf16_peak * world),
               "peak_mem_GiB_per_gpu": float(peak), "allreduce_ms": allreduce and allreduce * 1e3,
               "allreduce_bus_GBps": allreduce and 2 * (world - 1) / world * params * 4 / allreduce / 1e9}  # fmt: skip
        Path(a.result).write_text(json.dumps(row))
    tr.close()


def _key(r: dict) -> tuple:
    return r["model"], r["strategy"], r["gpus"], r.get("activation_checkpointing", False)


def run_row(model: str, strategy: str, gpus: int, a: argparse.Namespace, checkpointing: bool) -> dict:
    result = Path(tempfile.mkdtemp()) / "row.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", __file__,
           "--worker", "--model", model, "--strategy", strategy, "--result", str(result), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--reps", str(a.reps), *(["--smoke"] if a.smoke else []),
           *(["--checkpointing"] if checkpointing else [])]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    base = {"model": model, "strategy": strategy, "gpus": gpus, "activation_checkpointing": checkpointing,
            "wall_s": round(time.time() - t0, 1)}  # fmt: skip
    if proc.returncode or not result.is_file():
        errors = [line for line in (proc.stderr + proc.stdout).splitlines() if "Error" in line and ": " in line]
        return base | {"error": (errors[0] if errors else proc.stderr[-600:])[:600]}
    return base | json.loads(result.read_text())


def _others(r: dict) -> str:
    """A row measured in several runs shows its lowest, and the others in brackets."""
    others = [f"{v:.0f}" for v in sorted(r.get("runs_images_per_s", []))[1:]]
    return f" ({', '.join(others)})" if others else ""


def write_report(out: Path, data: dict) -> None:
    rows, meta = data["rows"], data["meta"]
    one = {_key(r)[:2] + _key(r)[3:]: r for r in rows if r.get("gpus") == 1 and "error" not in r}
    lines = ["# Scaling: training on 1 and 2 GPUs", "",
             f"{meta['device']} × up to {meta['gpus_available']}, torch {meta['torch']}, {meta['date']}. "
             f"Command: `{meta['command']}`", "",
             "| model | strategy | GPUs | batch/GPU | img/s | step ms | MFU | peak GiB/GPU | efficiency "
             "| all-reduce ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | {r['gpus']} | error: {r['error'][-120:]!r} |||||||")
            continue
        base = one.get(_key(r)[:2] + _key(r)[3:])
        eff = f"{r['images_per_s'] / (r['gpus'] * base['images_per_s']):.2f}" if base else "–"
        ar = f"{r['allreduce_ms']:.1f}" if r.get("allreduce_ms") else "–"
        ckpt = " + act. checkpointing" if r.get("activation_checkpointing") else ""
        lines.append(f"| {r['model']} ({r['params_M']} M) | {r['strategy']}{ckpt} | {r['gpus']} | "
                     f"{r['batch_per_gpu']} | {r['images_per_s']:.0f}{_others(r)} | {r['step_ms']:.1f} | "
                     f"{100 * r['mfu']:.1f} % | "
                     f"{r['peak_mem_GiB_per_gpu']:.1f} | {eff} | {ar} |")  # fmt: skip
    lines += [
        "",
        "On one GPU the ddp row is the plain single-process loop (no DDP wrapper) and fsdp a group of one rank. "
        "Efficiency: images/s on N GPUs over N × images/s on one.",
    ]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every row")
    ap.add_argument("--smoke", action="store_true", help="tiny models, CPU processes: checks the script only")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run that this one does not redo")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    available = torch.cuda.device_count() if not a.smoke else 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if available and not a.smoke else "cpu (smoke)",
            "gpus_available": available, "torch": torch.__version__,
            "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:])}  # fmt: skip
    data = {"meta": meta, "rows": []}
    jfile = out / "scaling.json"
    if (a.append or a.report_only) and jfile.is_file():  # one run per device call: the rows add up
        data = json.loads(jfile.read_text())
        if a.report_only:
            return write_report(out, data)
        data["meta"]["command"] += f"; then {meta['command']}"
    for gpus in (int(g) for g in a.gpus.split(",")):
        if gpus > available:
            print(f"{gpus} GPUs asked, {available} present: rows on {gpus} GPUs not run", flush=True)
            continue
        for row in a.rows.split(","):
            model, strategy, *ckpt = row.split(":")  # model:strategy[:ckpt] (activation checkpointing)
            key = (model, strategy, gpus, bool(ckpt) or a.checkpointing)
            data["rows"] = [r for r in data["rows"] if _key(r) != key]
            data["rows"].append(run_row(model, strategy, gpus, a, key[3]))
            print(json.dumps(data["rows"][-1]), flush=True)
            jfile.write_text(json.dumps(data, indent=1))
    write_report(out, data)
    print((out / "scaling.md").read_text())


if __name__ == "__main__":
    main()
