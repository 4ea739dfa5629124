"""What the training loop trains: an objective owns its modules, says which parameters each optimizer steps, and
computes the loss of a batch for each optimizer phase (in the spirit of Lightning's ``training_step``).

The loop knows nothing of diffusion. One optimizer step of the loop runs the objective's ``phases`` in order;
each phase has its own optimizer, LR schedule and gradient scaler, accumulates gradients over the micro-batches
and steps. Denoising score matching is one phase ("model"); a generator/discriminator pair is two, stepped
alternately; a frozen teacher or a frozen base with adapters is one phase whose ``parameters_for`` returns only
the trainable ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .stream import Batch

__all__ = ["Objective"]


class Objective(nn.Module):
    """Base class of what :class:`~sdeflow.training.Trainer` trains. Subclasses set ``name`` and ``phases`` and
    implement :meth:`parameters_for` and :meth:`loss`; the other hooks have defaults."""

    name: str = "objective"
    phases: tuple[str, ...] = ("model",)
    static_graph: bool = False  # the same parameters get gradients at every step (lets DDP plan its all-reduces once)
    # one phase whose loss has fixed shapes, no host synchronisation and no branch on batch.step: train.cuda_graph
    # can capture its step (and then calls after_step with the step count as a device tensor)
    graphable: bool = False

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        """The parameters the optimizer of ``phase`` updates (frozen modules contribute none)."""
        raise NotImplementedError

    def loss(self, batch: Batch, phase: str) -> Tensor:
        """The scalar loss of ``batch`` for ``phase``. Draw randomness from ``batch.randn`` / ``batch.rand`` (or
        ``batch.generator``) so that resume and multi-process runs repeat it exactly."""
        raise NotImplementedError

    def optimizer_options(self, phase: str) -> dict[str, Any]:
        """Options that override the config's for this phase's optimizer (e.g. a GAN's betas)."""
        return {}

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the forward passes of the trainable modules through ``wrap(module)`` (DDP, ``torch.compile``).
        Only the forward path changes: parameters, EMA and saved weights stay with the unwrapped modules."""

    def distribute_copies(self, shard: Callable[[nn.Module], nn.Module]) -> None:
        """Apply ``shard`` (FSDP2) to the copies that follow the trained modules step by step (the EMA), so that
        their parameters are split across the ranks as the trained ones are."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step with the new step count (EMA updates go here)."""

    def saved_modules(self) -> tuple[nn.Module, nn.Module | None]:
        """(model, ema): what a checkpoint stores as ``model.safetensors`` and ``ema.safetensors``."""
        return self, None

    def extra_state(self) -> dict[str, Any]:
        """Tensors besides the saved modules and optimizers that resuming needs (e.g. a consistency model's target
        network); stored in the checkpoint's ``state.pt``."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def meta(self) -> dict[str, Any]:
        """Extra entries for each checkpoint's ``meta.json`` (e.g. which autoencoder a latent model needs)."""
        return {}

    def report(self, out: Path, x: Tensor) -> dict[str, Any]:
        """At the end of a run: figures written into the run folder ``out`` and figures of merit on ``x`` (a
        few training images), for the run's summary."""
        return {}

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> tuple[Tensor, Tensor | None] | None:
        """n samples (and their labels) for the run's figures, or None if this objective draws none."""
        return None
