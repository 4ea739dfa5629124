"""What a run leaves to read: metrics.jsonl, TensorBoard scalars, a progress bar, the loss plot and sample
figures. Only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["RunLogger", "plot_losses", "save_samples_figure"]


class RunLogger:
    """Writes one JSON line per step ({"step", "loss", "lr"} and ``loss/<phase>`` for several phases), TensorBoard
    scalars at every flush, and the mean loss since the last ``log_every`` step on the progress bar."""

    def __init__(self, out: Path, name: str, total: int, start: int, log_every: int, tensorboard: bool, bar: bool):
        self.file, self.log_every, self.total = out / "metrics.jsonl", max(1, log_every), total
        self.bar = self.writer = None
        self._since: list[float] = []
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, first: int, rows: list[dict[str, float]], lr: float) -> None:
        """Steps ``first``, ``first + 1``, … with their losses by phase."""
        last = first + len(rows) - 1
        with open(self.file, "a") as f:
            for i, row in enumerate(rows):
                entry = {"step": first + i, "loss": sum(row.values()), "lr": lr}
                if len(row) > 1:
                    entry.update({f"loss/{k}": v for k, v in row.items()})
                f.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for k, v in rows[-1].items():
                self.writer.add_scalar(f"train/loss/{k}" if len(rows[-1]) > 1 else "train/loss", v, last)
            self.writer.add_scalar("train/lr", lr, last)
        self._since.extend(sum(r.values()) for r in rows)
        if self.bar is not None and (last % self.log_every == 0 or last >= self.total):
            self.bar.set_postfix(loss=f"{sum(self._since) / len(self._since):.4f}", lr=f"{lr:.2e}")
            self._since = []

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(losses: list[float], path: Path) -> None:
    """Loss per step and its running mean, log scale."""
    plt = _pyplot()
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


def save_samples_figure(samples: Tensor, path: Path, nrow: int | None = None, data: Tensor | None = None) -> Path:
    """A PNG grid of images (one class per column for class-cycled samples) or a scatter plot of 2-D samples over
    the data."""
    from ..data import save_image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        save_image_grid(samples, path, nrow=nrow, upscale=max(1, 64 // samples.shape[-1]))
        return path
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if data is not None:
        ax.scatter(*data[:2000].T.cpu(), s=2, alpha=0.3, label="data")
    ax.scatter(*samples.float().cpu().T, s=2, alpha=0.6, label="samples")
    ax.legend()
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_reconstructions(x: Tensor, recon: Tensor, path: Path, n: int = 32) -> Path:
    """A PNG grid: rows of originals, each followed by the row of their reconstructions."""
    from ..data import save_image_grid

    n = min(n, len(x))
    nrow = min(8, n)
    rows = [t for i in range(0, n, nrow) for t in (x[i : i + nrow], recon[i : i + nrow])]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(torch.cat(rows).float().cpu(), path, nrow=nrow, upscale=max(1, 64 // x.shape[-1]))
    return path


def save_codebook_plot(counts: Tensor, path: Path) -> Path:
    """Codebook usage: the EMA assignment count of every code, sorted, on a log scale."""
    plt = _pyplot()
    c = counts.float().cpu().sort(descending=True).values
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(c)), c.clamp_min(1e-3).numpy(), width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel(f"code (sorted), {int((c >= 1e-2).sum())} of {len(c)} in use")
    ax.set_ylabel("EMA count per batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
