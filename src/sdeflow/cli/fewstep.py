"""The few-step commands: ``sdeflow reflow`` (a flow's couplings), ``sdeflow ema`` (post-hoc EMA weights) and
``sdeflow schedule`` (a step grid optimised for one model and sampler)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..errors import UsageError

__all__ = ["add_parsers", "ema", "reflow", "schedule"]


def add_parsers(sub, on_device: dict) -> None:
    from ..sampling import SPECS
    from .args import listed, positive_float, positive_int

    r = sub.add_parser("reflow", help="draw a flow's couplings (noise, sample) for the next rectified flow")
    r.add_argument("checkpoint", help="the flow (a run's step folder)")
    r.add_argument("--out", required=True, help="the couplings folder (resumed where it stopped)")
    r.add_argument("--n", type=positive_int, default=50000)
    r.add_argument("--sampler", default="flow_heun", choices=list(SPECS), help="a deterministic ODE sampler")
    r.add_argument("--steps", type=positive_int, default=50)
    r.add_argument("--shard-size", type=positive_int, default=4096)
    r.add_argument("--cfg", type=float, help="classifier-free guidance weight of a class-conditional flow")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--straightness", type=int, default=1024, help="paths measured for the report (0: none)")
    r.add_argument("--no-ema", action="store_true")
    r.add_argument("--device", **on_device)
    r.set_defaults(func=reflow)

    e = sub.add_parser("ema", help="post-hoc EMA: weights of any EMA length from a run's snapshots (EDM2)")
    e.add_argument("run", help="the run folder (holds ema_snapshots/ and checkpoints/)")
    e.add_argument("--sigma-rel", type=listed(positive_float), required=True, help="e.g. 0.05,0.1,0.15")
    e.add_argument("--step", type=positive_int, help="the training step (default: the latest checkpoint's)")
    e.add_argument("--max-residual", type=positive_float, default=0.05, help="refuse worse reconstructions")
    e.add_argument("--out", help="where the checkpoints go (default RUN/posthoc_ema)")
    e.set_defaults(func=ema)

    s = sub.add_parser("schedule", help="optimise a sampler's step grid for a model; stored with the checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--sampler", default="dpmpp_2m", choices=list(SPECS))
    s.add_argument("--steps", type=positive_int, default=5)
    s.add_argument("--n", type=positive_int, default=256, help="initial noises the error is measured on")
    s.add_argument("--reference-steps", type=positive_int, default=256)
    s.add_argument("--sweeps", type=positive_int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--device", **on_device)
    s.set_defaults(func=schedule)


def _weights_sha(path: Path, ema: bool) -> str:
    return json.loads((path / "meta.json").read_text())["sha256"][f"{'ema' if ema else 'model'}.safetensors"]


def _labels(m, n: int, device: str):
    return torch.arange(n, device=device) % m.num_classes if m.num_classes else None


def reflow(args: argparse.Namespace) -> int:
    from ..builders import load
    from ..sampling.couplings import generate_couplings
    from ..sampling.guidance import ClassifierFreeGuidance
    from ..sampling.paths import path_straightness

    m = load(args.checkpoint, not args.no_ema, args.device)
    if m.text_encoder is not None or m.autoencoder is not None:
        raise UsageError(f"{m.path}: reflow of text-to-image and latent models is not supported")
    if args.cfg is not None and not m.num_classes:
        raise UsageError("--cfg guides a class-conditional flow; this one has no classes")
    model = ClassifierFreeGuidance(m.denoiser, args.cfg) if args.cfg is not None else m.denoiser
    teacher = {"teacher": str(m.path), "teacher_sha256": _weights_sha(m.path, not args.no_ema), "cfg": args.cfg}
    t0 = time.time()
    out = generate_couplings(model, m.process, m.data_shape, args.out, args.n, args.sampler, args.steps,
                             seed=args.seed, shard_size=args.shard_size, num_classes=m.num_classes, teacher=teacher,
                             device=args.device, progress=True)  # fmt: skip
    report = {"out": str(out), "n": args.n, "seconds": round(time.time() - t0, 1)}
    if args.straightness > 0:
        g = torch.Generator().manual_seed(args.seed + 1)
        noise = torch.randn((args.straightness, *m.data_shape), generator=g).to(args.device)
        report["teacher_paths"] = path_straightness(model, m.process, noise, cond=_labels(m, len(noise), args.device))
        (out / "straightness.json").write_text(json.dumps(report["teacher_paths"], indent=1))
    print(json.dumps(report, indent=1))
    return 0


def ema(args: argparse.Namespace) -> int:
    from ..checkpoint import find_latest, list_checkpoints, load_checkpoint, save_checkpoint
    from ..training.posthoc_ema import reconstruct

    run = Path(args.run)
    found = {int(p.name[5:]): p for p in list_checkpoints(run / "checkpoints")}
    base = found.get(args.step) if args.step else find_latest(run / "checkpoints")
    if base is None:
        raise UsageError(f"{run}/checkpoints holds no checkpoint{f' at step {args.step}' if args.step else ''}")
    ck = load_checkpoint(base)
    step = int(ck["meta"]["step"])
    out, rows = Path(args.out or run / "posthoc_ema"), []
    for std in args.sigma_rel:
        weights, residual = reconstruct(run / "ema_snapshots", std, step, args.max_residual)
        meta = {k: v for k, v in ck["meta"].items() if k not in ("sha256", "step")}
        meta["posthoc_ema"] = {"sigma_rel": std, "residual": residual, "snapshots": str(run / "ema_snapshots")}
        path = save_checkpoint(out / f"sigma_rel_{std:.4f}", step, ck["model"], weights, {"step": step}, meta)
        rows.append({"sigma_rel": std, "checkpoint": str(path), "residual": round(residual, 6)})
    print(json.dumps(rows, indent=1))
    return 0


def schedule(args: argparse.Namespace) -> int:
    from ..builders import load
    from ..sampling.optimize import optimize_schedule, save_schedule

    m = load(args.checkpoint, not args.no_ema, args.device)
    if m.text_encoder is not None:
        raise UsageError(f"{m.path}: schedules of text-to-image models are not supported yet")
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.n, *m.data_shape), generator=g).to(args.device)
    t0 = time.time()
    sigmas, errors = optimize_schedule(m.denoiser, m.process, args.sampler, args.steps, noise,
                                       _labels(m, args.n, args.device), args.reference_steps, args.sweeps)  # fmt: skip
    info = {"weights_sha256": _weights_sha(m.path, not args.no_ema), **errors, "n": args.n,
            "reference_steps": args.reference_steps, "seed": args.seed}  # fmt: skip
    path = save_schedule(m.path, args.sampler, args.steps, sigmas, info)
    print(json.dumps({"file": str(path), "sigmas": [round(float(s), 5) for s in sigmas], **errors,
                      "seconds": round(time.time() - t0, 1)}, indent=1))  # fmt: skip
    return 0
