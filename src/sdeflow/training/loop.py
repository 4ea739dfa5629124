"""The training loop: one loop for every objective, single process, or DDP / FSDP2 under torchrun.

Each optimizer step runs the objective's phases in order; each phase accumulates gradients over the
micro-batches of the deterministic stream (:mod:`~sdeflow.training.stream`), optionally clips them, and steps its
own optimizer, LR schedule and gradient scaler. Resumed runs and DDP runs repeat single uninterrupted runs exactly
because every random number comes from (seed, step).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..builders import resolve_base
from ..checkpoint import find_latest, load_checkpoint
from ..config import PRECISIONS, ConfigError, ExperimentConfig, save_config
from ..data import build_dataset
from ..errors import TrainingDivergedError
from . import run_folder, sharding, state
from .graphed import GraphedStep
from .latents import latent_data
from .objective import Objective
from .objectives import build_objective
from .optim import build_phases
from .posthoc_ema import PostHocEMA
from .run_log import RunLogger, plot_losses, save_samples_figure
from .runtime import Runtime
from .stream import BatchStream, step_seed

__all__ = ["Trainer", "TrainingDivergedError"]


def divergence(losses: dict[str, float], history: list[float], factor: float, window: int) -> str:
    """Why a step's losses end the run, or "": a NaN/Inf loss, or a total over ``factor`` × the median of the last
    ``window`` totals (a spike: the run is diverging before it overflows), checked while that median is positive."""
    bad = [f"{k} {v}" for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        return f"loss is {next(iter(losses.values()))}" if len(losses) == 1 else f"losses {bad} are not finite"
    if factor > 0 and window > 0 and len(history) >= window:
        median = statistics.median(history[-window:])
        # a ratio to the median means something for positive losses only (a VAE's −ELBO in nats can be < 0)
        if median > 0 and sum(losses.values()) > factor * median:
            return f"loss {sum(losses.values()):.4g} is over {factor:g}× the median {median:.4g} of the last {window}"
    return ""


def diverged(what: str, step: int, ckpt_dir: Path) -> TrainingDivergedError:
    last = find_latest(ckpt_dir) or "(none written yet)"
    return TrainingDivergedError(
        f"{what} at step {step}: training stopped. The last good checkpoint is {last}; lower train.lr, enable "
        "train.grad_clip or check the data for NaN/Inf (train.divergence_factor sets the spike check)."
    )


def final_report(objective: Objective, images: Any, out: Path, device: torch.device) -> dict[str, Any]:
    """The objective's end-of-run figures and figures of merit on up to 64 training images (in-memory data)."""
    x = getattr(images, "x", None)
    if x is None:
        return {}
    objective.eval()
    report = objective.report(out, x[:64].to(device))
    objective.train()
    return report


def to_device(dataset: Any, device: torch.device) -> None:
    """In-memory data (and a couplings dataset's noise) moved to the GPU: batches are gathered there, with no
    per-step host-to-device copies."""
    for key in ("x", "y", "noise") if hasattr(dataset, "x") and hasattr(dataset, "y") else ():
        if getattr(dataset, key, None) is not None:
            setattr(dataset, key, getattr(dataset, key).to(device))


def conditioning(cfg: ExperimentConfig, dataset: Any, images: Any) -> tuple[int, list[str] | None]:
    """(how many label values the batch stream hands over, the caption table of a text-conditioned model): class
    labels, or caption indices into the table of the dataset's distinct captions."""
    if cfg.model.num_classes and getattr(dataset, "num_classes", 0) == 0:
        raise ConfigError(f"model.num_classes = {cfg.model.num_classes} but dataset '{cfg.data.name}' has no labels")
    captions = getattr(images, "captions", None) if cfg.text.encoder else None
    return cfg.model.num_classes or len(captions or ()), captions


class Trainer:
    """Train an objective (default: the config's diffusion model) on the config's data.

    Args:
        cfg: the experiment.
        resume: False, True (the latest checkpoint in the run folder), or a checkpoint path.
        progress: show a progress bar (rank 0 only).
        stop_after: stop (as if killed) after this many steps of this invocation, for tests and time-boxed runs.
        objective: what to train; default :class:`DiffusionObjective` built from ``cfg``.
        overwrite: start afresh in a folder that holds a run, moving that run aside (see :mod:`.run_folder`).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        resume: bool | str = False,
        progress: bool = True,
        stop_after: int | None = None,
        objective: Objective | None = None,
        overwrite: bool = False,
    ):
        cfg = resolve_base(cfg)[0]  # fine-tuning: the base run's model, diffusion and text sections
        self.cfg, self.progress, self.stop_after = cfg, progress, stop_after
        t = cfg.train
        self.runtime = rt = Runtime.start(t)
        self.device, self.rank, self.world = rt.device, rt.rank, rt.world
        if t.batch_size % (t.grad_accum * self.world):
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must be divisible by grad_accum × world size "
                f"({t.grad_accum} × {self.world})"
            )
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if self.rank == 0:
            self.replaced = run_folder.prepare(self.out, resume, overwrite)
        if self.world > 1:
            dist.barrier()
        self.dataset = build_dataset(cfg.data, cfg.seed)
        self.data_shape = tuple(self.dataset.shape)
        self.images = self.dataset  # what figures and reports show
        autoencoder, cached = None, False  # latent diffusion: train on encodings
        if cfg.objective == "diffusion" and cfg.diffusion.autoencoder:
            self.dataset, autoencoder, self.data_shape, cached = latent_data(cfg, self.dataset, self.device, self.out)
        if self.device.type == "cuda":
            to_device(self.dataset, self.device)
        num_classes, captions = conditioning(cfg, self.dataset, self.images)
        channels_last = t.channels_last and len(self.data_shape) == 3
        self.stream = BatchStream(self.dataset, cfg.seed, t.batch_size // t.grad_accum, t.grad_accum, self.device,
                                  self.rank, self.world, num_classes, t.label_dropout, channels_last)  # fmt: skip
        torch.manual_seed(cfg.seed)
        self.objective = objective or build_objective(cfg, self.data_shape, autoencoder, cached, captions)
        self.objective.to(self.device)
        if channels_last and not rt.sharded:  # NHWC: cuDNN's tensor-core convolutions work in it natively (FSDP
            self.objective.to(memory_format=torch.channels_last)  # shards contiguous weights: NHWC batches only)
        # DDP's static graph: the same parameters every step, and one backward per step (no_sync breaks it)
        self.objective.distribute(rt.wrapper(t, self.objective.static_graph and t.grad_accum == 1))
        if rt.sharded:  # the EMA is sharded as the network is
            self.objective.distribute_copies(lambda m: sharding.shard_copy(m, self.device))
        self.phases = build_phases(self.objective, t, self.device)
        if self.rank == 0:  # a checkpoint: the objective's parameters (EMA included) and about as much optimizer state
            run_folder.check_disk(self.out, 2 * sum(p.numel() * p.element_size() for p in self.objective.parameters()))
        self.posthoc = PostHocEMA.of_run(t.ema, self.objective.saved_modules()[0], self.out, self.rank)
        self.step = 0
        self.losses: list[float] = []
        if resume:
            self._resume(find_latest(self.ckpt_dir) if resume is True else Path(resume))
        self.graphed = GraphedStep(self) if t.cuda_graph else None  # captured at the first step

    def train_step(self) -> dict[str, Tensor]:
        """One optimizer step of every phase; returns the (global mean) loss of each phase, not synchronised."""
        if self.graphed is not None:  # the whole step replayed from one CUDA graph
            return self.graphed()
        t, amp = self.cfg.train, PRECISIONS[self.cfg.train.precision]
        out = {}
        for k, phase in enumerate(self.objective.phases):
            if len(self.objective.phases) > 1:  # a phase's backward also reaches the other phases' parameters
                self.objective.zero_grad(set_to_none=True)
            total = torch.zeros((), device=self.device)
            for micro in range(t.grad_accum):
                batch = self.stream.batch(self.step, micro, k)
                if micro == 0:  # dropout layers: seeded once a step and phase (as a CUDA-graphed step is)
                    torch.manual_seed(step_seed(self.cfg.seed, self.step, 0, k) + self.rank)
                with self.runtime.accumulating(micro < t.grad_accum - 1):  # reduce once, on the last micro-batch
                    with torch.autocast(self.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        loss = self.objective.loss(batch, phase)
                    self.phases[phase].scaler.scale(loss / t.grad_accum).backward()
                total += loss.detach() / t.grad_accum
            p = self.phases[phase]
            if t.grad_clip:
                p.scaler.unscale_(p.optimizer)
                nn.utils.clip_grad_norm_(p.params, t.grad_clip)
            p.scaler.step(p.optimizer)
            p.scaler.update()
            p.optimizer.zero_grad(set_to_none=True)
            p.scheduler.step()
            if self.world > 1:  # the logged loss is the global mean
                dist.all_reduce(total, op=dist.ReduceOp.AVG)
            out[phase] = total
        self.step += 1
        self.objective.after_step(self.step)
        self.posthoc and self.posthoc.update(self.objective.saved_modules()[0], self.step)  # post-hoc EMA profiles
        return out

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; returns a summary. Raises TrainingDivergedError on a non-finite loss."""
        t = self.cfg.train
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        log = None
        if self.rank == 0:
            log = RunLogger(self.out, self.cfg.name, t.steps, self.step, t.log_every, t.tensorboard, self.progress)
        check_every = 1 if self.device.type == "cpu" else max(1, t.log_every)  # a check synchronises the GPU
        pending: list[dict[str, Tensor]] = []
        start_step, t0 = self.step, time.time()
        self.objective.train()
        try:
            while self.step < t.steps:
                if self.stop_after is not None and self.step - start_step >= self.stop_after:
                    raise KeyboardInterrupt(f"stopped after {self.stop_after} steps (stop_after)")
                pending.append(self.train_step())
                due_ckpt = t.ckpt_every > 0 and self.step % t.ckpt_every == 0
                if self.step % check_every == 0 or due_ckpt or self.step == t.steps:
                    self._flush(pending, log)
                    pending = []
                if due_ckpt:
                    self.save()
                if t.sample_every and self.step % t.sample_every == 0:
                    self.sample_figure(self.out / "samples" / f"step_{self.step:08d}.png")
                if log is not None:
                    log.advance()
            self._flush(pending, log)
            final = self.save() if (t.ckpt_every <= 0 or self.step % t.ckpt_every) else find_latest(self.ckpt_dir)
        finally:
            if log is not None:
                log.close()
        summary: dict[str, Any] = {"steps": self.step, "seconds": round(time.time() - t0, 2),
                                   "final_loss": self.losses[-1] if self.losses else None,
                                   "checkpoint": str(final) if final else None}  # fmt: skip
        figure = self.sample_figure(self.out / "samples.png") if self.losses else None
        if self.rank == 0 and self.losses:
            plot_losses(self.losses, self.out / "loss.png")
            if figure is not None:
                summary["samples"] = str(figure)
            summary.update(final_report(self.objective, self.images, self.out, self.device))
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def save(self) -> Path | None:
        """Write a checkpoint of the run now (rank 0; other ranks return None; every rank of a sharded run)."""
        sharded = self.runtime.sharded
        if self.rank != 0 and not sharded:
            return None
        if not sharding.all_finite((self.objective,), collective=sharded):  # every weight, EMA and frozen parts too
            raise diverged("the weights are not finite (nothing saved)", self.step, self.ckpt_dir)
        run = (self.cfg, self.objective, self.phases, self.data_shape, self.losses, self.posthoc, sharded)
        path = state.save(self.ckpt_dir, self.step, *run)
        return path if self.rank == 0 else None

    def sample_figure(self, path: Path, n: int | None = None) -> Path | None:
        """A PNG grid (images) or scatter plot (2-D) of the objective's samples, if it draws any, by rank 0 (a
        sharded model samples on every rank together; rank 0 writes)."""
        if self.rank != 0 and not self.runtime.sharded:
            return None
        drawn = self.objective.generate(n or self.cfg.sample.n, self.cfg.seed)
        if self.rank != 0 or not drawn:
            return None
        return save_samples_figure(drawn[0], path, self.cfg.model.num_classes or None, getattr(self.images, "x", None))

    def close(self) -> None:
        """Leave a distributed run cleanly (see :meth:`Runtime.close`); a no-op in a single process."""
        self.runtime.close(lambda: self.objective.distribute(lambda m: m))

    def _resume(self, path: Path | None) -> None:
        if path is not None:
            ck = load_checkpoint(path, weights=not self.runtime.sharded)  # a sharded run reads its own slices
            run_folder.check_resume_config(ck["meta"].get("config", {}), self.cfg.to_dict())
            self.step, self.losses = state.restore(ck, self.objective, self.phases, self.posthoc)
        if self.rank == 0:
            run_folder.truncate_metrics(self.out / "metrics.jsonl", self.step)
            print(f"resumed from {path} at step {self.step}" if path else f"no checkpoint under {self.ckpt_dir}")

    def _flush(self, pending: list[dict[str, Tensor]], log: RunLogger | None) -> None:
        """Bring the pending losses to the host, stop on a non-finite one, log them."""
        if not pending:
            return
        values = torch.stack([torch.stack(list(r.values())) for r in pending]).float().cpu().tolist()
        rows = [dict(zip(r, v)) for r, v in zip(pending, values)]
        first = self.step - len(rows) + 1
        t = self.cfg.train
        for i, row in enumerate(rows):
            what = divergence(row, self.losses, t.divergence_factor, t.divergence_window)
            if what:
                raise diverged(what, first + i, self.ckpt_dir)
            self.losses.append(sum(row.values()))
        if log is not None:
            log.write(first, rows, float(next(iter(self.phases.values())).scheduler.get_last_lr()[0]))
