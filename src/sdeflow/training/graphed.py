"""The whole training step replayed from one CUDA graph (``train.cuda_graph``).

A step of a small network is host-bound: Python launches the forward, backward, clipping, optimizer and EMA
kernels one by one, and the GPU waits between them. Here the step is captured once (Nguyen et al., "Accelerating
PyTorch with CUDA Graphs", 2021: whole-network capture) and each later step is a replay, whose inputs sit in static
buffers written before it:

- the dataset rows of each micro-batch (``BatchStream.rows_of``: index tensors on the GPU, copied in);
- the random numbers: one generator per micro-batch, registered with the graph and re-seeded with
  ``step_seed`` before every replay, so σ, ε, flips and label dropout are the eager step's (same seed, same
  Philox offsets); dropout draws from the default generator, seeded once a step;
- the learning rate (a device tensor the LR schedule fills) and the step count the EMA's β is computed from on
  the device.

What changes nothing but speed: each replay does what ``Trainer.train_step`` does for one phase (the gradients
are assigned by the first micro-batch's backward as after ``zero_grad(set_to_none=True)``). Capturing needs a few
warm-up steps (compilation, cuDNN autotuning, the optimizer's state); the weights, EMA and optimizer state are
put back as they were before them, so a graphed run repeats the eager one step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PRECISIONS, ConfigError
from .stream import step_seed

__all__ = ["GraphedStep"]

WARMUP_STEPS = 3


class _Rerun:
    """Stands in for ``torch.cuda.CUDAGraph`` off the GPU: replaying re-runs the captured function on the same
    static inputs, so the buffer plumbing is tested on a CPU."""

    def __init__(self, body: Callable[[], None]):
        self.body = body

    def replay(self) -> None:
        self.body()


class GraphedStep:
    """One optimizer step of ``trainer``'s single-phase objective as a CUDA graph replay.

    Args:
        trainer: a :class:`~sdeflow.training.Trainer` in one process, built (and resumed) already.
        capture: off the GPU, how to "capture" (tests): ``None`` takes CUDA graphs and needs a CUDA device.
    """

    def __init__(self, trainer: Any, capture: Callable[[Callable[[], None]], Any] | None = None):
        self.trainer, self.capture = trainer, capture
        obj, t, dev = trainer.objective, trainer.cfg.train, trainer.device
        why = []
        if capture is None and dev.type != "cuda":
            why.append(f"a CUDA device (this run trains on {dev.type})")
        if trainer.world > 1:
            why.append(f"one process (this run has {trainer.world}: use DDP/FSDP without it)")
        if not getattr(obj, "graphable", False) or len(obj.phases) != 1:
            why.append(f"an objective whose step has fixed shapes and no host synchronisation ('{obj.name}' has not)")
        if not hasattr(trainer.dataset, "x"):
            why.append(f"in-memory data (data.name '{trainer.cfg.data.name}' reads files at every step)")
        if why:
            raise ConfigError("train.cuda_graph needs " + "; ".join(why))
        self.phase = trainer.phases[obj.phases[0]]
        for group in self.phase.optimizer.param_groups if capture is None else ():
            # the LR schedule fills a device tensor the graph reads (float32, as the fused kernels read it); a
            # stand-in capture re-runs the Python step and reads the float as an eager step does
            group["lr"] = torch.tensor(float(group["lr"]), device=dev)
            group["capturable"] = True
        data = trainer.dataset.x
        self.rows = [torch.zeros(trainer.stream.local, dtype=torch.long, device=data.device) for _ in
                     range(t.grad_accum)]  # fmt: skip
        self.generators = [torch.Generator(device=dev) for _ in range(t.grad_accum)]
        self.next_step = torch.zeros((), dtype=torch.float64, device=dev)
        self.graph: Any = None
        self.total = torch.zeros((), device=dev)

    def __call__(self) -> dict[str, Tensor]:
        """Run step ``trainer.step`` (and advance it): the same work and result as ``Trainer.train_step``."""
        tr = self.trainer
        self._inputs(tr.step)
        if self.graph is None:
            self.graph = self._capture()
            self._inputs(tr.step)
        self.graph.replay()
        out = {tr.objective.phases[0]: self.total.clone()}  # the next replay overwrites the static loss
        self.phase.scheduler.step()
        tr.step += 1
        tr.posthoc and tr.posthoc.update(tr.objective.saved_modules()[0], tr.step)
        return out

    def _inputs(self, step: int) -> None:
        """Write step ``step``'s inputs into the static buffers (host work and tiny copies, nothing more)."""
        tr = self.trainer
        for micro, (rows, g) in enumerate(zip(self.rows, self.generators)):
            rows.copy_(tr.stream.rows_of(step, micro), non_blocking=True)
            g.manual_seed(step_seed(tr.cfg.seed, step, micro))
        torch.manual_seed(step_seed(tr.cfg.seed, step, 0) + tr.rank)  # dropout layers
        self.next_step.fill_(step + 1)

    def _body(self) -> None:
        """The step as the graph holds it: micro-batches, backward, clipping, optimizer, EMA."""
        tr, t = self.trainer, self.trainer.cfg.train
        amp, name = PRECISIONS[t.precision], tr.objective.phases[0]
        total = torch.zeros((), device=tr.device)
        for rows, g in zip(self.rows, self.generators):
            batch = tr.stream.gather(rows, g, tr.step)
            # autocast's weight-cast cache must stay off while capturing (the cached casts would be freed)
            with torch.autocast(tr.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None,
                                cache_enabled=False):  # fmt: skip
                loss = tr.objective.loss(batch, name)
            (loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
        if t.grad_clip:
            nn.utils.clip_grad_norm_(self.phase.params, t.grad_clip)
        self.phase.optimizer.step()
        tr.objective.after_step(self.next_step)
        self.total.copy_(total)

    def _capture(self) -> Any:
        """Warm up (compile, autotune, create the optimizer state) on a side stream, capture, then put the
        weights, EMA and optimizer state back as they were before the warm-up."""
        tr, opt = self.trainer, self.phase.optimizer
        tensors = [*tr.objective.parameters(), *tr.objective.buffers()]
        saved = [x.detach().clone() for x in tensors]
        had = {p: {k: v.clone() for k, v in s.items() if isinstance(v, Tensor)} for p, s in opt.state.items()}
        cuda = self.capture is None
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else nullcontext():
            for _ in range(WARMUP_STEPS if cuda else 1):
                opt.zero_grad(set_to_none=True)
                self._body()
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        if cuda:
            graph = torch.cuda.CUDAGraph()
            for g in self.generators:
                graph.register_generator_state(g)
            with torch.cuda.graph(graph):
                self._body()
        else:  # a replay starts from no gradients, as the captured first backward assigns them
            graph = self.capture(lambda: (opt.zero_grad(set_to_none=True), self._body()))
        with torch.no_grad():
            for x, old in zip(tensors, saved):
                x.copy_(old)
            for p, s in opt.state.items():  # a fresh run's Adam state is zeros (and step 0)
                for k, v in s.items():
                    if isinstance(v, Tensor):
                        v.copy_(had[p][k]) if p in had else v.zero_()
        return graph
