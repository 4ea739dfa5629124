"""Every sampler in one table: one :class:`SamplerSpec` per sampler holds its function and its facts (NFE for N
steps, whether it follows a forward process, whether it draws noise, its default grid, its paper). ``sample()``,
``steps_for_nfe``, the CLI, the README's table and the tests read this table and nothing else.

Every sampler is a small function written once against the denoiser D(x̃, σ, cond):

    sampler(model, x, sigmas, cond=None, *, generator=None, callback=None, **options) -> x0

``x`` is the initial state at σ_0 in σ-space x̃ = x0 + σ ε (e.g. ``process.sample_prior``), ``sigmas`` a
decreasing grid ending in 0 (:mod:`sdeflow.sampling.schedules`). Samplers defined by a process (DDPM's VP
chain, the reverse SDE, flow-time Euler) convert to that process's x_t = s(t)·x̃ internally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..core.process import FlowProcess, Process, VPDiscreteProcess
from .multistep import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, dpmpp_3m_sde, unipc
from .ode import adaptive_ode, edm_stochastic, euler, flow_euler, flow_heun, heun
from .stochastic import annealed_langevin, consistency, ddim, ddpm, euler_maruyama, predictor_corrector

__all__ = [
    "SAMPLERS",
    "SPECS",
    "SamplerSpec",
    "adaptive_ode",
    "annealed_langevin",
    "consistency",
    "ddim",
    "ddpm",
    "default_schedule",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "dpmpp_3m_sde",
    "edm_stochastic",
    "euler",
    "euler_maruyama",
    "flow_euler",
    "flow_heun",
    "get_spec",
    "heun",
    "nfe_per_steps",
    "predictor_corrector",
    "steps_for_nfe",
    "unipc",
]


def _n(steps: int, options: Mapping[str, Any]) -> int:
    return steps


def _heun_nfe(steps: int, options: Mapping[str, Any]) -> int:
    return 2 * steps - 1  # no correction on the last step, into σ = 0


@dataclass(frozen=True)
class SamplerSpec:
    """The facts of one sampler.

    Args:
        name: the name ``sample()`` and the CLI take.
        fn: the sampler function.
        nfe: network evaluations for N steps given the options; None where a tolerance sets them (adaptive).
        nfe_formula: the same, as the README writes it.
        paper: where the method comes from.
        needs_process: its maths is a forward process's (it takes ``process=``).
        stochastic: at its default options it draws fresh noise, so results depend on the generator (DDIM with
            η > 0 and EDM's sampler with S_churn > 0 do too).
        discrete_native: on a discrete VP process it walks DDPM's integer timesteps ('leading' grid) by default.
        on_flow: the sampler run instead on a flow process (EDM's σ-space Heun is ill-conditioned there).
        min_steps: fewest steps the method can take.
        schedule: its own default grid, where it has one.
    """

    name: str
    fn: Callable[..., Tensor]
    nfe: Callable[[int, Mapping[str, Any]], int] | None
    nfe_formula: str
    paper: str
    needs_process: bool = False
    stochastic: bool = False
    discrete_native: bool = False
    on_flow: str | None = None
    min_steps: int = 1
    schedule: str | None = None

    def default_schedule(self, process: Process) -> str:
        """The sampler's own grid if it has one; SD3's shifted grid on flows; diffusers' 'leading' grid for
        DDPM/DDIM on a discrete process; else Karras."""
        if self.schedule is not None:
            return self.schedule
        if isinstance(process, FlowProcess):
            return "flow"
        if isinstance(process, VPDiscreteProcess) and self.discrete_native:
            return "leading"
        return "karras"

    def resolve(self, process: Process) -> SamplerSpec:
        """The spec that actually runs on ``process``."""
        return SPECS[self.on_flow] if self.on_flow and isinstance(process, FlowProcess) else self


_SPECS = (
    SamplerSpec("ddpm", ddpm, _n, "N", "Ho et al. 2020", stochastic=True, discrete_native=True),
    SamplerSpec("ddim", ddim, _n, "N", "Song et al. 2021", discrete_native=True),
    SamplerSpec("euler", euler, _n, "N", "Karras et al. 2022"),
    SamplerSpec("heun", heun, _heun_nfe, "2N − 1", "Karras et al. 2022, Alg. 1", on_flow="flow_heun"),
    SamplerSpec("edm_stochastic", edm_stochastic, _heun_nfe, "2N − 1", "Karras et al. 2022, Alg. 2"),
    SamplerSpec("euler_maruyama", euler_maruyama, _n, "N", "Song et al. 2021", needs_process=True, stochastic=True),
    SamplerSpec(
        "pc",
        predictor_corrector,
        lambda n, o: n * (1 + o.get("corrector_steps", 1)),
        "N(1 + corrector steps)",
        "Song et al. 2021",
        needs_process=True,
        stochastic=True,
    ),
    SamplerSpec(
        "annealed_langevin",
        annealed_langevin,
        lambda n, o: n * o.get("steps_per_level", 5) + int(o.get("final_denoise", True)),
        "N · steps per level (+1)",
        "Song & Ermon 2019",
        stochastic=True,
    ),
    SamplerSpec("dpmpp_2m", dpmpp_2m, _n, "N", "Lu et al. 2022"),
    SamplerSpec("dpmpp_3m", dpmpp_3m, _n, "N", "Lu et al. 2022"),
    SamplerSpec("dpmpp_2m_sde", dpmpp_2m_sde, _n, "N", "Lu et al. 2022", stochastic=True),
    SamplerSpec("dpmpp_3m_sde", dpmpp_3m_sde, _n, "N", "Lu et al. 2022", stochastic=True),
    SamplerSpec("unipc", unipc, _n, "N", "Zhao et al. 2023"),
    SamplerSpec("flow_euler", flow_euler, _n, "N", "Liu et al. 2022; SD3", needs_process=True),
    SamplerSpec("flow_heun", flow_heun, _heun_nfe, "2N − 1", "diffusers' FlowMatchHeun", needs_process=True),
    SamplerSpec(
        "consistency",
        consistency,
        _n,
        "N",
        "Song et al. 2023, Alg. 1",
        needs_process=True,
        stochastic=True,
        schedule="consistency",
    ),
    SamplerSpec("adaptive", adaptive_ode, None, "as needed", "Dormand & Prince 1980", min_steps=2),
)
SPECS: dict[str, SamplerSpec] = {s.name: s for s in _SPECS}
SAMPLERS: dict[str, Callable[..., Tensor]] = {s.name: s.fn for s in _SPECS}


def get_spec(name: str) -> SamplerSpec:
    if name not in SPECS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {sorted(SPECS)}")
    return SPECS[name]


def default_schedule(sampler: str, process: Process) -> str:
    """The grid ``sampler`` walks on ``process`` when none is named (see :meth:`SamplerSpec.default_schedule`)."""
    return get_spec(sampler).resolve(process).default_schedule(process)


def nfe_per_steps(name: str, steps: int, **options: Any) -> int:
    """Network evaluations the sampler ``name`` spends on ``steps`` steps."""
    spec = get_spec(name)
    if spec.nfe is None:
        raise ValueError(f"the {name} sampler's NFE is set by its tolerances, not by steps")
    return spec.nfe(steps, options)


def steps_for_nfe(name: str, nfe: int, **options: Any) -> int:
    """The most steps whose NFE does not exceed ``nfe`` (at least 1)."""
    steps = 1
    while nfe_per_steps(name, steps + 1, **options) <= nfe:
        steps += 1
    return steps
