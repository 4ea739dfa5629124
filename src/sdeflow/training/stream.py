"""The deterministic batch stream: (seed, step, micro-batch) → this rank's batch and its random numbers.

All randomness of optimizer step k (data order, augmentation, label dropout, and whatever the objective draws:
σ, ε, latent codes) comes from (seed, k) alone, and every rank draws it for the *global* micro-batch before
taking its own rows. Hence a run stopped at step N and resumed continues exactly (bitwise on a CPU), and DDP on
W processes computes the same updates as one process on the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..core.mixture import NULL_LABEL

__all__ = ["Batch", "BatchStream", "step_seed"]


def step_seed(seed: int, step: int, micro: int, phase: int = 0) -> int:
    """The seed of micro-batch ``micro`` of optimizer step ``step`` (and optimizer phase ``phase``)."""
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + phase * 15_485_863) % (2**62)


@dataclass
class Batch:
    """One rank's share of a global micro-batch, with the generator its objective draws from.

    ``randn``/``rand`` draw for the whole global micro-batch and return this rank's rows, so the numbers a sample
    gets do not depend on how many processes share the batch.
    """

    x: Tensor
    labels: Tensor | None
    generator: torch.Generator
    global_size: int
    rows: slice
    channels_last: bool = False
    step: int = 0  # the optimizer step this batch belongs to (for objectives with step-dependent terms)
    noise: Tensor | None = None  # a couplings dataset's noise paired with each x (reflow)

    def randn(self, *shape: int) -> Tensor:
        out = torch.randn((self.global_size, *shape), generator=self.generator, device=self.generator.device)
        return self._layout(out[self.rows])

    def rand(self, *shape: int) -> Tensor:
        out = torch.rand((self.global_size, *shape), generator=self.generator, device=self.generator.device)
        return out[self.rows]

    def randn_like_x(self) -> Tensor:
        return self.randn(*self.x.shape[1:]).to(self.x.dtype)

    def _layout(self, t: Tensor) -> Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.ndim == 4 else t


class BatchStream:
    """Batches of the infinite stream of shuffled epochs of ``dataset``.

    Args:
        micro: the global micro-batch size (batch size / gradient accumulation).
        rank, world: this process's rows are ``rank·micro/world … (rank+1)·micro/world``.
        label_dropout: probability of replacing a label by the null label (classifier-free guidance training).
        channels_last: hand images (and their noise) over in NHWC layout.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        micro: int,
        grad_accum: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        channels_last: bool = False,
    ):
        self.dataset, self.seed, self.micro, self.grad_accum = dataset, seed, micro, grad_accum
        self.device, self.rank, self.local = device, rank, micro // world
        self.num_classes, self.label_dropout, self.channels_last = num_classes, label_dropout, channels_last
        self._perm: tuple[int, Tensor] | None = None

    def indices(self, start: int, n: int) -> Tensor:
        """Dataset indices of samples start..start+n of the stream.

        Each epoch's permutation is drawn on the CPU (the same on every device) and, for data held on the GPU,
        copied there once per epoch: a per-step copy would make the host wait for the GPU at every step."""
        size = len(self.dataset)
        out, k = [], start
        while k < start + n:
            epoch, off = divmod(k, size)
            if self._perm is None or self._perm[0] != epoch:
                perm = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 1_000_033 + epoch))
                data = getattr(self.dataset, "x", None)
                if isinstance(data, Tensor) and data.device.type == "cuda":
                    perm = perm.pin_memory().to(data.device, non_blocking=True)
                self._perm = (epoch, perm)
            take = min(size - off, start + n - k)
            out.append(self._perm[1][off : off + take])
            k += take
        return torch.cat(out)

    def batch(self, step: int, micro: int, phase: int = 0) -> Batch:
        """This rank's share of micro-batch ``micro`` of optimizer step ``step``."""
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, step, micro, phase))
        return self.gather(self.rows_of(step, micro), g, step)

    def rows_of(self, step: int, micro: int) -> Tensor:
        """Dataset indices of this rank's rows of micro-batch ``micro`` of step ``step`` (on the data's device)."""
        rows = slice(self.rank * self.local, (self.rank + 1) * self.local)
        idx = self.indices((step * self.grad_accum + micro) * self.micro, self.micro)[rows]
        data = getattr(self.dataset, "x", None)
        return idx.to(data.device) if isinstance(data, Tensor) else idx

    def gather(self, idx: Tensor, g: torch.Generator, step: int = 0) -> Batch:
        """The batch of dataset rows ``idx`` with its random numbers from ``g`` (seeded for its step and
        micro-batch): flips and label dropout here, σ and ε in the objective. For in-memory data it issues GPU
        work only, so a CUDA graph can capture it with ``idx`` and ``g`` as its inputs."""
        rows = slice(self.rank * self.local, (self.rank + 1) * self.local)
        ds = self.dataset
        noise = None
        if hasattr(ds, "x") and hasattr(ds, "y"):
            x, y = ds.x[idx], ds.y[idx]
            if getattr(ds, "noise", None) is not None:  # couplings: the noise each sample was drawn from
                noise = self._layout(ds.noise[idx].to(self.device, non_blocking=True))
        else:
            items = [ds[int(i)] for i in idx]
            x, y = torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])
        u = torch.rand((2, self.micro), generator=g, device=self.device)[:, rows]  # label dropout, flips
        x = x.to(self.device, non_blocking=True)
        if getattr(ds, "horizontal_flip", False) and x.ndim == 4:
            x = torch.where((u[1] < 0.5)[:, None, None, None], x.flip(-1), x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = None
        if self.num_classes:
            labels = y.to(self.device)
            if self.label_dropout > 0:
                labels = torch.where(u[0] < self.label_dropout, torch.full_like(labels, NULL_LABEL), labels)
        return Batch(x, labels, g, self.micro, rows, self.channels_last, step, noise)

    def _layout(self, t: Tensor) -> Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.ndim == 4 else t
