"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §3 and
appendix C.3): choose the EMA length after training.

During training, power-function EMA profiles with relative stds σ_rel,i are tracked (β_t = (1 − 1/t)^{γ_i+1},
:class:`~sdeflow.training.ema.EMA`) and a snapshot of each is written every ``every`` steps. The average of a
profile after step T is exactly a known combination of the training iterates θ_1 … θ_T:

    θ̄_T = Σ_{k ≤ T} w_T(k) θ_k,   w_T(k) = (1 − (1 − 1/k)^{γ+1}) · (k/T)^{γ+1}

(the product Π_{j=k+1}^T β_j telescopes to (k/T)^{γ+1}). A profile (σ_rel, T) that was not tracked is then the
combination Σ_i x_i θ̄_i of the snapshots whose responses w_i best match its own in least squares, G x = b with
G_ij = ⟨w_i, w_j⟩ and b_i = ⟨w_i, w_target⟩ (EDM2's reconstruction; we sum the exact discrete responses instead of
EDM2's continuous approximation, so a profile that was tracked is recovered to rounding). The relative residual
‖Σ x_i w_i − w_target‖ / ‖w_target‖ says how well the snapshots reach the target; beyond ``max_residual`` the
reconstruction is refused rather than returned.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from .ema import EMA, power_exponent

__all__ = ["PostHocEMA", "list_snapshots", "reconstruct", "response", "solve_coefficients"]

_NAME = re.compile(r"^phema_(\d{8})_(\d+\.\d{4})\.safetensors$")


def response(steps: np.ndarray, gammas: np.ndarray, k: np.ndarray) -> np.ndarray:
    """w_T(k): the weight the power-function EMA (exponent γ) after step T gives iterate k (1-based); 0 for k > T.
    ``steps``/``gammas`` broadcast against ``k``."""
    steps, gammas, k = np.asarray(steps, np.float64), np.asarray(gammas, np.float64), np.asarray(k, np.float64)
    first = -np.expm1((gammas + 1) * np.log1p(-1 / np.maximum(k, 2)))  # 1 − (1 − 1/k)^{γ+1}, exactly 1 at k = 1
    first = np.where(k == 1, 1.0, first)
    return np.where(k <= steps, first * (k / steps) ** (gammas + 1), 0.0)


def solve_coefficients(
    steps: list[int], stds: list[float], target_step: int, target_std: float, chunk: int = 1 << 15
) -> tuple[np.ndarray, float]:
    """(x, relative residual): the snapshot coefficients (summing to 1) that best reproduce the profile
    (``target_std``, ``target_step``) from snapshots of profiles ``stds`` taken after ``steps``."""
    s = np.asarray(steps, np.float64)[:, None]
    g = np.array([power_exponent(v) for v in stds])[:, None]
    gt = power_exponent(target_std)
    gram, b, c = np.zeros((len(s), len(s))), np.zeros(len(s)), 0.0
    for lo in range(1, int(max(s.max(), target_step)) + 1, chunk):  # Σ over iterates in chunks: O(S²·T), small memory
        k = np.arange(lo, min(lo + chunk, int(max(s.max(), target_step)) + 1), dtype=np.float64)[None, :]
        w, wt = response(s, g, k), response(np.float64(target_step), gt, k[0])
        gram += w @ w.T
        b += w @ wt
        c += float(wt @ wt)
    x = np.linalg.lstsq(gram, b, rcond=1e-12)[0]
    residual = max(float(x @ gram @ x - 2 * x @ b + c), 0.0) ** 0.5 / c**0.5
    return x / x.sum(), residual


class PostHocEMA:
    """The tracked profiles of a run and their snapshots, written every ``every`` steps into ``folder`` as
    ``phema_<step>_<σ_rel>.safetensors`` (each atomically: a crash mid-write leaves no partial snapshot)."""

    def __init__(self, model: nn.Module, stds: list[float], every: int, folder: Path):
        self.stds, self.every, self.folder = list(stds), every, Path(folder)
        self.trackers = [EMA(model, "power", std=s) for s in self.stds]

    @classmethod
    def of_run(cls, ema: Any, model: nn.Module, out: Path, rank: int) -> PostHocEMA | None:
        """The trackers a run's ``train.ema`` section asks for (rank 0 only; None if it asks for none)."""
        if not ema.posthoc or rank != 0:
            return None
        return cls(model, ema.posthoc, ema.posthoc_every, Path(out) / "ema_snapshots")

    def update(self, model: nn.Module, step: int) -> None:
        for t in self.trackers:
            t.update(model, step)
        if step % self.every == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for std, t in zip(self.stds, self.trackers):
                path = self.folder / f"phema_{step:08d}_{std:.4f}.safetensors"
                tmp = path.with_suffix(".tmp")
                weights = {k: v.detach().contiguous().cpu() for k, v in t.model.state_dict().items()}
                save_file(weights, tmp)  # step and σ_rel are in the name; no metadata map (its order varies)
                os.replace(tmp, path)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"{std:.4f}": t.model.state_dict() for std, t in zip(self.stds, self.trackers)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """Restore the trackers of a checkpoint at ``step`` and drop snapshots written after it (a resumed run
        writes them again, identically)."""
        for std, t in zip(self.stds, self.trackers):
            if f"{std:.4f}" not in state:
                raise CheckpointError(f"the checkpoint holds no post-hoc EMA profile σ_rel = {std} (train.ema.posthoc)")
            t.model.load_state_dict(state[f"{std:.4f}"])
        for snap_step, _, path in list_snapshots(self.folder):
            if snap_step > step:
                path.unlink()


def list_snapshots(folder: str | Path) -> list[tuple[int, float, Path]]:
    """(step, σ_rel, path) of every snapshot under ``folder``, by step then σ_rel."""
    folder = Path(folder)
    found = [(int(m[1]), float(m[2]), p) for p in folder.glob("phema_*.safetensors") if (m := _NAME.match(p.name))]
    return sorted(found)


def reconstruct(
    folder: str | Path, std: float, step: int | None = None, max_residual: float = 0.05
) -> tuple[dict[str, torch.Tensor], float]:
    """(weights, relative residual) of the EMA profile σ_rel = ``std`` at ``step`` (default: the last snapshot's)
    from the snapshots in ``folder``; refused when the snapshots cannot reach it within ``max_residual``."""
    snaps = list_snapshots(folder)
    if not snaps:
        raise CheckpointError(f"no post-hoc EMA snapshots under {folder}: train with train.ema.posthoc set")
    step = snaps[-1][0] if step is None else step
    used = [s for s in snaps if s[0] <= step]
    stored = sorted({s[1] for s in snaps})
    if not 0 < std < 12**-0.5:
        raise ConfigError(f"σ_rel must lie in (0, 0.2887), got {std}")
    if not used:
        raise ConfigError(f"no post-hoc EMA snapshot at or before step {step} under {folder}")
    x, residual = solve_coefficients([s[0] for s in used], [s[1] for s in used], step, std)
    if residual > max_residual:
        raise ConfigError(
            f"σ_rel {std} at step {step} is outside the reach of the stored profiles (σ_rel {stored}, "
            f"{len(used)} snapshots up to step {used[-1][0]}): the best combination's weights over the training "
            f"steps are {100 * residual:.1f} % off the target's (limit {100 * max_residual:.0f} %)"
        )
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coef, (_, _, path) in zip(x, used):
        try:
            weights = load_file(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read post-hoc EMA snapshot {path}: {e}") from None
        for k, v in weights.items():
            dtypes[k] = v.dtype
            if not v.is_floating_point():  # counters and the like: the latest value
                out[k] = v
                continue
            acc = out.get(k)
            out[k] = coef * v.double() if acc is None else acc + coef * v.double()
    return {k: v.to(dtypes[k]) for k, v in out.items()}, residual
