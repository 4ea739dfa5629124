"""What each ``sdeflow`` subcommand does with its parsed arguments."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import torch

from ..core.condition import ControlCondition
from ..errors import UsageError

__all__ = ["demo", "evaluate", "load_model_from_checkpoint", "nll", "sample", "train"]

TEXT_MODEL = (
    "{what} unconditional and class-conditional models; a text-to-image model is measured by prompt adherence "
    "(sdeflow.evaluation.adherence; python benchmarks/text_to_image.py --phase eval)"
)


def train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training import Trainer

    cfg = load_config(args.config, [*args.set, *([f"finetune.base={args.base}"] if args.base else [])])
    if args.out:
        cfg.out_dir = args.out
    trainer = Trainer(cfg, resume=args.resume or False, progress=not args.quiet, overwrite=args.overwrite)
    summary = trainer.fit()
    trainer.close()  # under torchrun: wait for every rank, then leave cleanly
    if trainer.rank == 0:
        print(json.dumps(summary, indent=1))
    return 0


def load_model_from_checkpoint(path: str | Path, ema: bool = True, device: str = "cpu"):
    """(denoiser, recipe, data_shape, num_classes, config) of a checkpoint; :func:`sdeflow.load` returns more."""
    from ..builders import load

    m = load(path, ema, device)
    return m.denoiser, m.recipe, m.data_shape, m.num_classes, m.config


def _accelerated(model, den, args: argparse.Namespace):
    """``model`` (``den`` or a guidance wrapper around it) with the speed options of ``args``."""
    from ..config import PRECISIONS
    from ..sampling import accelerate_denoiser

    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        raise UsageError("--cuda-graphs needs --device cuda")
    if args.cast_weights and PRECISIONS[args.precision] is None:
        raise UsageError("--cast-weights needs --precision bf16 or fp16")
    return accelerate_denoiser(
        model,
        args.precision,
        args.compile,
        args.cuda_graphs,
        channels_last=args.channels_last,
        cast_weights=args.cast_weights,
        network=den,  # ``model`` may be a guidance wrapper around den
    )


def sample(args: argparse.Namespace) -> int:
    import numpy as np

    from ..builders import load
    from ..data import save_image_grid, save_prompt_grid
    from ..sampling import sample

    m = load(args.checkpoint, not args.no_ema, args.device, args.text_encoder)
    den, r, shape, cfg = m.denoiser, m.recipe, m.data_shape, m.config
    _add_adapters(args, den.net)
    prompts = _prompts(args, m)
    args.n = args.n or (len(prompts) if prompts else 64)
    cond, null, labels = _condition(args, m, prompts)
    cond = _control(args, den.net, cond, shape)
    model = den
    if args.cfg is not None:
        from ..sampling.guidance import ClassifierFreeGuidance

        model = ClassifierFreeGuidance(den, args.cfg, args.cfg_interval, null=null)
    if args.control_interval is not None:
        if not args.control:
            raise UsageError("--control-interval sets where --control acts: give --control PATH")
        from ..sampling.guidance import ControlInterval

        model = ControlInterval(model, args.control_interval)
    model = _accelerated(model, den, args)
    t0 = time.time()
    res = sample(
        model,
        (args.n, *shape),
        r.process,
        args.sampler or cfg.sample.sampler,
        args.steps if args.steps is not None else cfg.sample.steps,
        args.schedule,
        cond=cond,
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = m.decode(res.samples).float().cpu()  # latent diffusion: decoded to images
    shape = tuple(x.shape[1:])
    np.savez(out / "samples.npz", x=x.numpy(), y=(labels.cpu().numpy() if labels is not None else np.array([])))
    if prompts:  # sample i drew prompt i mod K: one column per prompt in the grid
        (out / "prompts.txt").write_text("".join(f"{prompts[i % len(prompts)]}\n" for i in range(args.n)))
    k = len(prompts)
    if len(shape) == 3 and 0 < k <= 16 and args.n % k == 0:  # one row per prompt, the prompt written beside it
        order = [i for p in range(k) for i in range(p, args.n, k)]
        save_prompt_grid(x[order], prompts, out / "samples.png", upscale=max(1, 64 // shape[-1]))
    elif len(shape) == 3:
        save_image_grid(x, out / "samples.png", nrow=int(np.ceil(np.sqrt(args.n))), upscale=max(1, 64 // shape[-1]))
    print(json.dumps({"out": str(out), "n": args.n, "nfe": res.nfe, "seconds": round(time.time() - t0, 2)}))
    return 0


def _control(args: argparse.Namespace, net, cond, shape: tuple[int, ...]):
    """``--control PATH``: the control images (cycled over the samples) in a ControlCondition around ``cond``."""
    from ..models.controlnet import ControlledNet

    if not isinstance(net, ControlledNet):
        if args.control:
            raise UsageError(f"--control needs a ControlNet run; {args.checkpoint} has no ControlNet")
        return cond
    if not args.control:
        raise UsageError(f"{args.checkpoint} is a ControlNet run: give its control image(s) with --control PATH")
    from ..data.control import load_control_images

    try:
        images = load_control_images(args.control, shape[-1], net.controlnets[0].control_channels)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--control: {e}") from None
    net.scales = [args.control_scale]
    images = images[torch.arange(args.n) % len(images)].to(args.device)
    return ControlCondition(cond, (images,))


def _add_adapters(args: argparse.Namespace, net) -> None:
    """``--lora DIR`` (repeatable) with ``--lora-scale``: adapters loaded onto the base, their updates summed."""
    if not args.lora:
        if args.lora_scale:
            raise UsageError("--lora-scale scales the adapters of --lora DIR: give at least one")
        return
    from ..models.lora import activate_lora, active_lora, load_lora

    scales = args.lora_scale or [1.0]
    if len(scales) not in (1, len(args.lora)):
        raise UsageError(f"--lora-scale gives {len(scales)} scales for {len(args.lora)} adapters: give one or one each")
    names = [f"adapter{i}" for i in range(len(args.lora))]
    trained = active_lora(net)  # a LoRA run's own adapter keeps acting
    for name, folder, scale in zip(names, args.lora, scales * len(args.lora) if len(scales) == 1 else scales):
        if not Path(folder).is_dir():
            raise UsageError(f"--lora {folder}: no such folder")
        load_lora(net, folder, name, scale)
    activate_lora(net, [*trained, *names])


def _prompts(args: argparse.Namespace, m) -> list[str]:
    """The prompts of --prompt / --prompts FILE (one per line), refused for a model that takes none."""
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UsageError(f"--prompts: file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts: {path} holds no prompts (one per line)")
    if m.text_encoder is None and (prompts or args.negative_prompt is not None):
        what = "class-conditional (use --class)" if m.num_classes else "unconditional"
        raise UsageError(f"--prompt / --prompts / --negative-prompt need a text-to-image model; this one is {what}")
    if m.text_encoder is not None and not prompts:
        raise UsageError("this model is text-to-image: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _condition(args: argparse.Namespace, m, prompts: list[str]):
    """(cond, null for guidance, labels to save) of the sample command."""
    if prompts:
        from ..sampling.prompts import encode_prompts

        cond = encode_prompts(m.text_encoder, [prompts[i % len(prompts)] for i in range(args.n)], args.device)
        return cond, m.text_encoder.encode([args.negative_prompt or ""]).to(args.device), None
    num_classes = m.num_classes
    if args.class_label is not None or args.cfg is not None:
        if not num_classes:
            raise UsageError("--class/--cfg need a class-conditional or text-to-image model")
        if args.class_label is not None and not 0 <= args.class_label < num_classes:
            raise UsageError(f"--class must lie in [0, {num_classes})")
    if not num_classes:
        return None, None, None
    labels = (
        torch.full((args.n,), args.class_label) if args.class_label is not None else torch.arange(args.n) % num_classes
    )
    return labels.to(args.device), None, labels


def demo(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..demo import digits_demo_metrics
    from ..training import Trainer

    cfg_path = resources.files("sdeflow") / "demo.yaml"
    overrides = [f"out_dir={args.out}"] + (args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(str(cfg_path), overrides)
    t0 = time.time()
    trainer = Trainer(cfg, progress=not args.quiet, overwrite=args.overwrite)
    summary = trainer.fit()
    metrics = {"train_seconds": round(time.time() - t0, 1), **summary, **digits_demo_metrics(trainer)}
    metrics["total_seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.out_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    print(f"\nsample grid: {out / 'samples.png'}\nloss plot:   {out / 'loss.png'}\nmetrics:     {out / 'metrics.json'}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from ..builders import load
    from ..checkpoint import load_checkpoint
    from ..data import build_dataset
    from ..evaluation import evaluate_samplers, write_eval_report

    if load_checkpoint(args.checkpoint)["meta"].get("objective", "diffusion") != "diffusion":
        return _evaluate_generator(args)
    m = load(args.checkpoint, not args.no_ema, args.device)
    den, r, shape, num_classes, cfg = m.denoiser, m.recipe, m.data_shape, m.num_classes, m.config
    if m.text_encoder is not None:
        raise UsageError(TEXT_MODEL.format(what="sdeflow eval scores samplers of"))
    model = den
    if args.cfg is not None:
        from ..sampling.guidance import ClassifierFreeGuidance

        model = ClassifierFreeGuidance(den, args.cfg)
    model = _accelerated(model, den, args)
    ds = build_dataset(cfg.data, cfg.seed)
    if not hasattr(ds, "x") or len(shape) != 3:
        raise UsageError("sdeflow eval needs an image dataset held in memory")
    feature_fns, reference, real = _features(args, ds, cfg)
    rows = evaluate_samplers(
        model,
        r.process,
        shape,
        args.samplers,
        args.nfe,
        args.n,
        feature_fns,
        reference,
        num_classes,
        args.seed,
        args.device,
        real_features=real,
        decode=m.decode,
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


def _features(args: argparse.Namespace, ds, cfg):
    """(feature functions, reference statistics, real features) of ``sdeflow eval``'s feature spaces."""
    from ..evaluation import feature_spaces

    cache = Path(args.cache or Path(args.checkpoint).resolve().parent.parent / "eval_cache")
    feature_fns, reference, real = feature_spaces(
        ds.x, ds.y, cache, cfg.data.name, args.device, args.fid, args.inception_weights
    )
    if not feature_fns:
        raise UsageError("no feature space: the dataset has no labels for the classifier; pass --fid")
    return feature_fns, reference, real


def _evaluate_generator(args: argparse.Namespace) -> int:
    """``sdeflow eval`` of a GAN, VAE or flow checkpoint: one network pass per sample (NFE 1), same metrics."""
    from ..data import build_dataset
    from ..evaluation import evaluate_generator, write_eval_report
    from ..training.objectives import load_objective

    objective, cfg = load_objective(args.checkpoint, not args.no_ema, args.device)
    if objective.generate(1, 0) is None:
        raise UsageError(
            f"{args.checkpoint} is a '{cfg.objective}' checkpoint that draws no samples (an autoencoder without a "
            "prior: only the VAE, autoencoder.reconstruction 'gaussian', samples); evaluate its reconstructions "
            "with benchmarks/latent_baselines.py or use it as diffusion.autoencoder"
        )
    ds = build_dataset(cfg.data, cfg.seed)
    feature_fns, reference, real = _features(args, ds, cfg)
    rows = [evaluate_generator(objective.generate, args.n, feature_fns, reference, args.seed, real_features=real,
                               name=cfg.objective if cfg.objective != "autoencoder" else "vae")]  # fmt: skip
    meta = {"checkpoint": str(args.checkpoint), "dataset": cfg.data.name, "n": args.n, "ema": not args.no_ema}
    write_eval_report(rows, args.out, f"Sample quality of the {rows[0]['sampler']}", meta)
    print((Path(args.out) / "eval.md").read_text())
    return 0


def nll(args: argparse.Namespace) -> int:
    import math

    from ..checkpoint import load_checkpoint
    from ..config import DataConfig
    from ..data import build_dataset
    from ..sampling.likelihood import bits_per_dim, dequantize, log_likelihood

    if load_checkpoint(args.checkpoint)["meta"].get("objective", "diffusion") != "diffusion":
        return _exact_nll(args)
    den, r, shape, _num_classes, cfg = load_model_from_checkpoint(args.checkpoint, not args.no_ema, args.device)
    if cfg.text.encoder:
        raise UsageError(TEXT_MODEL.format(what="sdeflow nll measures the likelihood of"))
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
            args.sigma_max if args.sigma_max is not None else r.process.sigma_max,
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


def _exact_nll(args: argparse.Namespace) -> int:
    """``sdeflow nll`` of the other families: their own ``evaluate`` (flow and autoregressive models: the exact
    likelihood; the VAE: its ELBO)."""
    from ..config import DataConfig
    from ..data import build_dataset
    from ..training.objectives import load_objective

    objective, cfg = load_objective(args.checkpoint, not args.no_ema, args.device)
    if not hasattr(objective, "evaluate"):
        raise UsageError(f"{args.checkpoint} is a '{cfg.objective}' checkpoint, which has no likelihood to measure")
    ds = build_dataset(DataConfig(**{**cfg.data.__dict__, "split": args.split}), cfg.seed)
    x = ds.x[: args.n].to(args.device)
    labels = ds.y[: args.n].to(args.device) if cfg.model.num_classes else None
    g = torch.Generator(args.device).manual_seed(args.seed)
    out = objective.evaluate(x, labels, g)
    print(json.dumps(out, indent=1))
    return 0
