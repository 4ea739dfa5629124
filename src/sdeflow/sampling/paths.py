"""How straight a flow's sampled paths are: what reflow lowers (Liu et al. 2022, §2.3 and eq. 7).

Along the ODE path x_t from noise (t = 1) to data (t = 0), with the velocity v̂ = dx_t/dt:

    straightness  S = ∫_0^1 E ‖(x_1 − x_0) − v̂(x_t, t)‖² dt   (0 exactly when every path is a straight line,
                                                                  which one Euler step then follows exactly)
    relative      S / E ‖x_1 − x_0‖²
    curvature     E ∫ ‖dv̂/dt‖ dt / E ‖x_1 − x_0‖  (how much the velocity turns, relative to the path's length)

measured on the path :func:`~sdeflow.sampling.ode.flow_euler` walks with ``steps`` uniform steps in t; norms are
per dimension (mean over coordinates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.preconditioning import DenoiserFn
from ..core.process import FlowProcess, Process
from .steps import velocity

__all__ = ["path_straightness"]


@torch.no_grad()
def path_straightness(
    model: DenoiserFn, process: Process, noise: Tensor, steps: int = 100, cond: Tensor | None = None
) -> dict[str, float]:
    """S, S relative and the curvature of the paths from ``noise`` (unit normal ε, x_1 = t_max ε) to data."""
    if not isinstance(process, FlowProcess):
        raise ValueError(f"straightness is defined on a flow's paths; the process is '{process.name}'")
    t = torch.linspace(process.t_max, 0.0, steps + 1, dtype=torch.float64).tolist()
    xt = noise * t[0]
    start, vs = xt, []
    for i in range(steps):
        ti = max(t[i], process.t_min)
        v = velocity(model, xt, float(process.sigma(ti)), ti, cond, process)
        vs.append(v)
        xt = xt + (t[i + 1] - t[i]) * v
    displacement = (start - xt) / (t[0] - t[-1])  # x_1 − x_0 per unit time
    dims = tuple(range(1, noise.ndim))
    straight = torch.stack([(displacement - v).square().mean(dims) for v in vs]).mean()
    length = displacement.square().mean(dims).mean()
    turn = torch.stack([(vs[i + 1] - vs[i]).square().mean(dims).sqrt() for i in range(steps - 1)]).sum(0) if (
        steps > 1) else torch.zeros(())  # fmt: skip
    curvature = turn.mean() / displacement.square().mean(dims).sqrt().mean()
    return {"straightness": float(straight), "relative": float(straight / length), "curvature": float(curvature)}
