"""The training loop: one loop for every recipe and backbone, single process or DDP under torchrun.

Reproducibility by construction: all randomness of optimizer step k (data order, noise levels σ, noise ε,
label dropout, flips, and the seed of dropout layers) is derived from (seed, k) alone, and every process
draws it for the *global* batch before taking its own slice. Hence

- a run stopped at step N and resumed from its checkpoint continues exactly (bitwise on CPU), and
- DDP on W processes computes the same updates as one process on the same global batch.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import CheckpointError, find_latest, load_checkpoint, load_weights, save_checkpoint
from .config import ConfigError, DiffusionConfig, ExperimentConfig, ModelConfig, save_config
from .data import build_dataset, save_image_grid
from .ema import EMA
from .losses import Recipe, denoising_loss, recipe
from .models import build_model
from .models.layers import ATTENTION_BACKENDS, set_attention_backend
from .preconditioning import Denoiser
from .process import get_process
from .sampling import PRECISIONS, sample

__all__ = ["Trainer", "TrainingDivergedError", "build_denoiser", "build_network", "build_recipe"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def build_recipe(cfg: DiffusionConfig) -> Recipe:
    """The recipe named by ``diffusion.recipe`` with any of its parts overridden."""
    r = recipe(cfg.recipe)
    over: dict[str, Any] = {"sigma_data": cfg.sigma_data}
    if cfg.process is not None or cfg.process_kwargs:
        name = cfg.process if cfg.process is not None else r.process.name
        over["process"] = get_process(name, **cfg.process_kwargs)
    for key in ("parameterization", "sigma_sampling", "weighting"):
        if getattr(cfg, key) is not None:
            over[key] = getattr(cfg, key)
    return replace(r, **over)


def build_network(cfg: ModelConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """The backbone for data of shape ``data_shape`` (C, H, W) or (D,)."""
    kw = dict(cfg.kwargs)
    if cfg.num_classes:
        kw["num_classes"] = cfg.num_classes
    if cfg.kind == "mlp":
        kw.setdefault("dim", math.prod(data_shape))
        return build_model("mlp", **kw)
    if len(data_shape) != 3:
        raise ConfigError(f"model.kind '{cfg.kind}' needs image data (C, H, W), got shape {data_shape}")
    if cfg.kind == "unet":
        kw.setdefault("img_resolution", data_shape[-1])
        kw.setdefault("in_channels", data_shape[0])
    elif cfg.kind == "dit":
        kw.setdefault("input_size", data_shape[-1])
        kw.setdefault("in_channels", data_shape[0])
    return build_model(cfg.kind, preset=cfg.preset, **kw)


def build_denoiser(net: nn.Module, r: Recipe, cfg: DiffusionConfig, check_range: bool = True) -> Denoiser:
    return Denoiser(net, r.process, r.parameterization, cfg.sigma_data, cfg.time_scale, check_range=check_range)


def _step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 7919 + micro * 104_729) % (2**62)


class Trainer:
    """Train a model from an :class:`~sdeflow.config.ExperimentConfig`.

    Args:
        cfg: the experiment.
        resume: False, True (the latest checkpoint in the run folder), or a checkpoint path.
        progress: show a progress bar (rank 0 only).
        stop_after: stop (as if killed) after this many steps of this invocation — for tests and time-boxed runs.
    """

    def __init__(
        self, cfg: ExperimentConfig, resume: bool | str = False, progress: bool = True, stop_after: int | None = None
    ):
        self.cfg, self.progress, self.stop_after = cfg, progress, stop_after
        t = cfg.train
        for name, value in (
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {sorted(PRECISIONS)}, got '{t.precision}'")
        if t.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"train.attention_backend must be one of {ATTENTION_BACKENDS}, got '{t.attention_backend}'"
            )
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if t.compile_mode not in modes:
            raise ConfigError(f"train.compile_mode must be one of {modes}, got '{t.compile_mode}'")
        if t.compile_options:
            if t.compile_mode != "default":
                raise ConfigError("train.compile_options exclude a train.compile_mode other than default")
            from torch._inductor import list_options

            unknown = sorted(set(t.compile_options) - set(list_options()))
            if unknown:
                raise ConfigError(f"train.compile_options: unknown Inductor option(s) {unknown}")
        if t.lr_schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"train.lr_schedule must be constant, cosine or linear, got '{t.lr_schedule}'")
        if not 0 <= t.label_dropout < 1:
            raise ConfigError(f"train.label_dropout must lie in [0, 1), got {t.label_dropout}")
        # distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if t.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(t.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
            set_attention_backend(t.attention_backend, self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if t.batch_size % (t.grad_accum * self.world):
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must be divisible by grad_accum × world size "
                f"({t.grad_accum} × {self.world})"
            )
        self.micro = t.batch_size // t.grad_accum  # global micro-batch
        self.local = self.micro // self.world  # this rank's share

        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.dataset = build_dataset(cfg.data, cfg.seed)
        self.data_shape = tuple(self.dataset.shape)
        if self.device.type == "cuda" and hasattr(self.dataset, "x") and hasattr(self.dataset, "y"):
            # in-memory data lives on the GPU: batches are gathered there, no per-step host-to-device copies
            self.dataset.x, self.dataset.y = self.dataset.x.to(self.device), self.dataset.y.to(self.device)
        self.num_classes = cfg.model.num_classes
        if self.num_classes and getattr(self.dataset, "num_classes", 0) == 0:
            raise ConfigError(f"model.num_classes = {self.num_classes} but dataset '{cfg.data.name}' has no labels")
        self.recipe = build_recipe(cfg.diffusion)
        torch.manual_seed(cfg.seed)
        self.net = build_network(cfg.model, self.data_shape).to(self.device)
        self.channels_last = t.channels_last and len(self.data_shape) == 3
        if self.channels_last:  # NHWC: cuDNN's tensor-core convolutions work in this layout natively
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = EMA(self.net, t.ema.kind, t.ema.decay, t.ema.std, t.ema.start_step) if t.ema.kind != "none" else None
        fwd: nn.Module = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            fwd = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            if t.compile_options:
                fwd = torch.compile(fwd, options=dict(t.compile_options))
            else:
                fwd = torch.compile(fwd, mode=None if t.compile_mode == "default" else t.compile_mode)
        self.ddp_module = fwd
        self.denoiser = build_denoiser(fwd, self.recipe, cfg.diffusion, check_range=False)
        self._params = list(self.net.parameters())
        self.opt = self._optimizer()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.step = 0
        self.losses: list[float] = []
        self._since_log: list[float] = []
        self._perm_cache: tuple[int, Tensor] | None = None
        if resume:
            self._resume(resume)

    # ------------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        names = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "radam": "RAdam", "adagrad": "Adagrad"}
        cls = getattr(torch.optim, names.get(t.optimizer.lower(), t.optimizer), None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
            raise ConfigError(f"train.optimizer: unknown torch optimizer '{t.optimizer}'")
        kw: dict[str, Any] = {"lr": t.lr, "weight_decay": t.weight_decay}
        if "betas" in cls.__init__.__code__.co_varnames:
            kw["betas"] = tuple(t.betas)
        if t.fused_optimizer and self.device.type == "cuda" and "fused" in cls.__init__.__code__.co_varnames:
            kw["fused"] = True  # the whole update in one kernel instead of a few per parameter group
        return cls(self.net.parameters(), **kw)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        frac = min(1.0, step / max(1, t.steps))
        decay = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac}[t.lr_schedule]
        return warm * decay

    def _resume(self, resume: bool | str) -> None:
        path = find_latest(self.ckpt_dir) if resume is True else Path(resume)
        if path is None:
            if self.rank == 0:
                print(f"no checkpoint under {self.ckpt_dir}: starting from scratch")
            return
        ck = load_checkpoint(path)
        load_weights(self.net, ck["model"], str(path / "model.safetensors"))
        if self.ema is not None:
            load_weights(self.ema.model, ck["ema"], str(path / "ema.safetensors"))
        st = ck["state"]
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["lr_scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng"]["torch"])
        random.setstate(st["rng"]["python"])
        self.step = int(st["step"])
        self.losses = list(st.get("losses", []))
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------
    def _indices(self, start: int, n: int) -> Tensor:
        """Dataset indices of samples start..start+n of the infinite stream of shuffled epochs.

        Each epoch's permutation is drawn on the CPU (the same on every device) and, for data held on the
        GPU, copied there once per epoch: a per-step host-to-device copy of the indices would make the host
        wait for the GPU at every step and leave the GPU idle while the next step is launched."""
        size = len(self.dataset)
        out = []
        k = start
        while k < start + n:
            epoch, off = divmod(k, size)
            if self._perm_cache is None or self._perm_cache[0] != epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_033 + epoch)
                perm = torch.randperm(size, generator=g)
                data = getattr(self.dataset, "x", None)
                if isinstance(data, Tensor) and data.device.type == "cuda":
                    perm = perm.pin_memory().to(data.device, non_blocking=True)
                self._perm_cache = (epoch, perm)
            take = min(size - off, start + n - k)
            out.append(self._perm_cache[1][off : off + take])
            k += take
        return torch.cat(out)

    def _batch(self, step: int, micro: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """This rank's (x0, labels, σ, ε) for micro-batch ``micro`` of optimizer step ``step``."""
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        idx = self._indices((step * self.cfg.train.grad_accum + micro) * self.micro, self.micro)[lo:hi]
        ds = self.dataset
        if hasattr(ds, "x") and hasattr(ds, "y"):
            idx = idx.to(ds.x.device)
            x0, y = ds.x[idx], ds.y[idx]
        else:
            items = [ds[int(i)] for i in idx]
            x0 = torch.stack([it[0] for it in items])
            y = torch.tensor([it[1] for it in items])
        g = torch.Generator(device=self.device).manual_seed(_step_seed(self.cfg.seed, step, micro))
        sigma = self.recipe.sample_sigma(self.micro, g, self.device)[lo:hi]
        noise = torch.randn((self.micro, *self.data_shape), generator=g, device=self.device)[lo:hi]
        u = torch.rand((2, self.micro), generator=g, device=self.device)[:, lo:hi]
        x0 = x0.to(self.device, non_blocking=True)
        if getattr(ds, "horizontal_flip", False) and x0.ndim == 4:
            x0 = torch.where((u[1] < 0.5)[:, None, None, None], x0.flip(-1), x0)
        if self.channels_last and x0.ndim == 4:
            x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
        labels = None
        if self.num_classes:
            labels = y.to(self.device)
            if self.cfg.train.label_dropout > 0:
                labels = torch.where(u[0] < self.cfg.train.label_dropout, torch.full_like(labels, -1), labels)
        return x0, labels, sigma, noise

    def _train_step(self) -> Tensor:
        t = self.cfg.train
        amp = PRECISIONS[t.precision]
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            x0, labels, sigma, noise = self._batch(self.step, micro)
            torch.manual_seed(_step_seed(self.cfg.seed, self.step, micro) + self.rank)  # dropout layers
            last = micro == t.grad_accum - 1
            sync = (
                nullcontext()
                if (last or self.world == 1 or not hasattr(self.ddp_module, "no_sync"))
                else self.ddp_module.no_sync()
            )
            with sync:
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    loss = denoising_loss(
                        self.denoiser, x0, sigma, self.recipe.weight(sigma), noise=noise, cond=labels
                    ).mean()
                self.scaler.scale(loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
        if t.grad_clip:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self._params, t.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.net, self.step)
        if self.world > 1:  # the logged loss is the global mean
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        return total

    # ------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        if self.rank != 0:
            return None
        state = {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "lr_scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "samples_seen": self.step * self.cfg.train.batch_size,
            "losses": self.losses,
        }
        meta = {
            "config": self.cfg.to_dict(),
            "data_shape": list(self.data_shape),
            "num_classes": self.num_classes,
            "sdeflow_version": _version(),
        }
        return save_checkpoint(
            self.ckpt_dir,
            self.step,
            self.net,
            self.ema.model if self.ema else None,
            state,
            meta,
            keep_last=self.cfg.train.keep_last,
        )

    def ema_denoiser(self) -> Denoiser:
        return build_denoiser((self.ema.model if self.ema else self.net).eval(), self.recipe, self.cfg.diffusion)

    @torch.no_grad()
    def sample_ema(self, n: int, seed: int | None = None):
        """n samples from the EMA model with the configured sampler; conditional models cycle through classes."""
        s = self.cfg.sample
        labels = torch.arange(n, device=self.device) % self.num_classes if self.num_classes else None
        res = sample(
            self.ema_denoiser(),
            (n, *self.data_shape),
            self.recipe.process,
            s.sampler,
            s.steps,
            s.schedule,
            cond=labels,
            seed=self.cfg.seed if seed is None else seed,
            device=self.device,
        )
        self.net.train()
        return res, labels

    def sample_figure(self, path: Path, n: int | None = None) -> Path:
        """A PNG grid (images) or scatter plot (2-D) of EMA samples."""
        res, _ = self.sample_ema(n or self.cfg.sample.n)
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(self.data_shape) == 3:
            save_image_grid(res.samples, path, nrow=self.num_classes or None, upscale=max(1, 64 // self.data_shape[-1]))
        else:
            _scatter(res.samples, path, getattr(self.dataset, "x", None))
        return path

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; returns a summary. Raises TrainingDivergedError on a non-finite loss."""
        t = self.cfg.train
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        writer = self._tensorboard()
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc=self.cfg.name, dynamic_ncols=True)
        check_every = 1 if self.device.type == "cpu" else max(1, t.log_every)
        pending: list[Tensor] = []
        start_step, t0 = self.step, time.time()
        self.net.train()
        log_file = self.out / "metrics.jsonl"
        try:
            while self.step < t.steps:
                if self.stop_after is not None and self.step - start_step >= self.stop_after:
                    raise KeyboardInterrupt(f"stopped after {self.stop_after} steps (stop_after)")
                pending.append(self._train_step())
                due_ckpt = t.ckpt_every > 0 and self.step % t.ckpt_every == 0
                if self.step % check_every == 0 or due_ckpt or self.step == t.steps:
                    self._flush(pending, log_file, writer, bar)
                    pending = []
                if due_ckpt:
                    self.save()
                if t.sample_every and self.step % t.sample_every == 0 and self.rank == 0:
                    self.sample_figure(self.out / "samples" / f"step_{self.step:08d}.png")
                if bar is not None:
                    bar.update(1)
            self._flush(pending, log_file, writer, bar)
            final = self.save() if (t.ckpt_every <= 0 or self.step % t.ckpt_every) else find_latest(self.ckpt_dir)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        summary: dict[str, Any] = {
            "steps": self.step,
            "seconds": round(time.time() - t0, 2),
            "final_loss": self.losses[-1] if self.losses else None,
            "checkpoint": str(final) if final else None,
        }
        if self.rank == 0 and self.losses:
            plot_losses(self.losses, self.out / "loss.png")
            summary["samples"] = str(self.sample_figure(self.out / "samples.png"))
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def close(self) -> None:
        """Leave a distributed run cleanly: every rank waits for the others, the DDP wrapper (which holds the
        process group and its reducer) is released, then the process group is destroyed. Destroying the group
        while DDP still referenced it could abort a rank at exit. A no-op in a single process."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            self.denoiser = self.ddp_module = None  # type: ignore[assignment]
            gc.collect()
            dist.destroy_process_group()

    def _flush(self, pending: list[Tensor], log_file: Path, writer: Any, bar: Any) -> None:
        if not pending:
            return
        values = torch.stack(pending).float().cpu().tolist()
        first = self.step - len(values) + 1
        for i, v in enumerate(values):
            if not math.isfinite(v):
                last = find_latest(self.ckpt_dir)
                raise TrainingDivergedError(
                    f"loss is {v} at step {first + i}: training stopped. The last good checkpoint is "
                    f"{last if last else '(none written yet)'}; lower train.lr, enable train.grad_clip or check "
                    "the data for NaN/Inf."
                )
        self.losses.extend(values)
        if self.rank != 0:
            return
        lr = self.sched.get_last_lr()[0]
        with open(log_file, "a") as f:
            for i, v in enumerate(values):
                f.write(json.dumps({"step": first + i, "loss": v, "lr": lr}) + "\n")
        if writer is not None:
            writer.add_scalar("train/loss", values[-1], self.step)
            writer.add_scalar("train/lr", lr, self.step)
        self._since_log.extend(values)
        if bar is not None and (self.step % max(1, self.cfg.train.log_every) == 0 or self.step >= self.cfg.train.steps):
            bar.set_postfix(loss=f"{sum(self._since_log) / len(self._since_log):.4f}", lr=f"{lr:.2e}")
            self._since_log = []

    def _tensorboard(self) -> Any:
        if not self.cfg.train.tensorboard or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


def _version() -> str:
    from . import __version__

    return __version__


def plot_losses(losses: list[float], path: Path) -> None:
    """Loss per step and its running mean, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, label="loss")
    w = max(1, len(losses) // 50)
    if len(losses) >= w:
        run = torch.tensor(losses).unfold(0, w, 1).mean(1).tolist()
        ax.plot(range(w, len(losses) + 1), run, lw=1.5, label=f"mean over {w} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scatter(samples: Tensor, path: Path, data: Tensor | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    if data is not None:
        ax.scatter(*data[:2000].T.cpu(), s=2, alpha=0.3, label="data")
    ax.scatter(*samples.float().cpu().T, s=2, alpha=0.6, label="samples")
    ax.legend()
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ += ["CheckpointError", "plot_losses"]
