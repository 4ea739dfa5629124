"""A whole sampling run replayed from one CUDA graph: for interactive batches (1–4 images), where the GPU would
otherwise wait on Python between the solver's small kernels and the network evaluations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.preconditioning import DenoiserFn
from ..core.process import Process
from .generate import sample
from .samplers import get_spec

__all__ = ["CUDAGraphSampler"]


class CUDAGraphSampler:
    """``sample(model, …)`` with every network evaluation and the solver's arithmetic between them in one CUDA
    graph.

    :func:`~sdeflow.sample` launches each step's solver kernels from Python, and :class:`CUDAGraphDenoiser` one
    graph per evaluation; at batch 1 the GPU still idles between them. Here the first call for a (shape, dtype,
    condition shape) runs the sampler twice on a side stream (compilation, autotuning) and captures the third
    run, the initial noise draw included; each later call re-seeds the graph's generator, copies the condition in
    and replays. The grid's coefficients are constants of the graph (a fixed schedule), and the generator is
    registered with it, so a call returns exactly what ``sample(model, shape, process, sampler, steps, seed=seed,
    cond=cond)`` returns, stochastic samplers included. Samplers that choose their steps on the host
    (``adaptive``) cannot be captured.

    Args:
        model: a denoiser D(x, σ, cond) not itself replayed from graphs (an accelerated or compiled one is fine).
        process, sampler, steps, schedule, options: as for :func:`~sdeflow.sample`.
    """

    def __init__(
        self,
        model: DenoiserFn,
        process: Process,
        sampler: str = "heun",
        steps: int = 18,
        schedule: str | None = None,
        warmup: int = 2,
        **options: Any,
    ):
        if get_spec(sampler).resolve(process).name == "adaptive":
            raise ValueError("sampler 'adaptive' chooses its steps on the host: a CUDA graph cannot hold it")
        self.model, self.process, self.warmup = model, process, warmup
        self.kwargs = {"sampler": sampler, "steps": steps, "schedule": schedule, **options}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Generator, Tensor | None, Tensor]] = {}

    def __call__(
        self,
        shape: tuple[int, ...],
        cond: Tensor | None = None,
        seed: int = 0,
        device: torch.device | str = "cuda",
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``shape[0]`` samples (a new tensor) for ``seed``, the same as ``sample(..., seed=seed)``'s."""
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if cond is not None and cond.device != device:
            cond = cond.to(device)
        key = (tuple(shape), dtype, device, None if cond is None else (tuple(cond.shape), cond.dtype))
        if key not in self.graphs:
            self.graphs[key] = self._capture(tuple(shape), cond, device, dtype)
        graph, generator, static_cond, out = self.graphs[key]
        generator.manual_seed(seed)  # the replay reads the generator's seed and offset
        if static_cond is not None:
            static_cond.copy_(cond)
        graph.replay()
        return out.clone()

    @torch.no_grad()
    def _capture(self, shape: tuple[int, ...], cond: Tensor | None, device: torch.device, dtype: Any) -> tuple:
        generator = torch.Generator(device=device)
        static_cond = None if cond is None else cond.clone()

        def run() -> Tensor:
            return sample(self.model, shape, self.process, cond=static_cond, generator=generator, device=device,
                          dtype=dtype, **self.kwargs).samples  # fmt: skip

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                generator.manual_seed(0)
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(generator)
        generator.manual_seed(0)
        with torch.cuda.graph(graph):
            out = run()
        return graph, generator, static_cond, out
