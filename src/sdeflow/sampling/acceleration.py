"""Faster denoisers for sampling: autocast to bf16/fp16, channels-last activations, weights stored in the
reduced precision, ``torch.compile`` and CUDA-graph replay. Each keeps the D(x, σ, cond) interface, so it works
with every sampler and guidance wrapper; the sampler's state and the preconditioning stay fp32."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.preconditioning import DenoiserFn

__all__ = ["PRECISIONS", "CUDAGraphDenoiser", "accelerate_denoiser", "cast_network_weights"]

# The one table of precisions: autocast dtype by name (None: full fp32). Config, trainer and CLI read it.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Autocast:
    """Runs a denoiser's network under autocast (bf16 / fp16 matrix products) and/or on channels-last
    (NHWC) input; the sampler state stays fp32 in the sampler's layout."""

    def __init__(self, model: DenoiserFn, dtype: torch.dtype | None, cache: bool = True, channels_last: bool = False):
        self.model, self.dtype, self.cache, self.channels_last = model, dtype, cache, channels_last

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # weight-cast caching must be off inside CUDA-graph capture (the cache is freed on exit)
        with torch.autocast(
            x.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None, cache_enabled=self.cache
        ):
            return self.model(x, sigma, cond).contiguous()


class CUDAGraphDenoiser:
    """D(x, σ, cond) replayed from CUDA graphs (inference only).

    On the first call with a new (shape, dtype, condition) the call is warmed up on a side stream and
    captured into a :class:`torch.cuda.CUDAGraph` with static input buffers; later calls copy their
    inputs into those buffers and replay the whole network as one launch, removing the per-kernel
    launch cost that dominates small models and small batches. The output is cloned, so samplers may
    keep earlier denoised estimates (DPM-Solver++ multistep) across calls.
    """

    def __init__(self, model: DenoiserFn, warmup: int = 2):
        self.model, self.warmup = model, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, Tensor]] = {}

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the sample on a CUDA device, got {x.device}")
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        key = (
            tuple(x.shape),
            x.dtype,
            x.device,
            sigma.dtype,
            None if cond is None else (tuple(cond.shape), cond.dtype),
        )
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, sigma, cond)
        graph, (sx, ss, sc), out = self.graphs[key]
        sx.copy_(x)
        ss.copy_(sigma)
        if sc is not None:
            sc.copy_(cond)
        graph.replay()
        return out.clone()

    @torch.no_grad()
    def _capture(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> tuple:
        static = (x.clone(), sigma.clone(), None if cond is None else cond.clone())
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up: cuDNN autotuning, lazy initialisation, compilation
            for _ in range(self.warmup):
                self.model(*static)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(*static)
        return graph, static, out


def cast_network_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store the floating-point parameters of ``model``'s network (``model.net`` for a
    :class:`~sdeflow.Denoiser`, else ``model``) in ``dtype``, in place, as diffusers pipelines do with
    ``.to(torch.bfloat16)``. Buffers (the fp32 frequencies of the noise embeddings, positional tables) and
    the preconditioning stay as they are. Run the result under autocast (``accelerate_denoiser`` does):
    products then need no weight cast, and the activations between them are stored in ``dtype``."""
    net = getattr(model, "net", model)
    if not isinstance(net, torch.nn.Module):
        raise ValueError("cast_weights needs the denoiser as a torch module (e.g. sdeflow.Denoiser)")
    for p in net.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def accelerate_denoiser(
    model: DenoiserFn,
    precision: str = "fp32",
    compile: bool = False,
    cuda_graphs: bool = False,
    compile_mode: str | None = None,
    channels_last: bool = False,
    cast_weights: bool = False,
    cudnn_benchmark: bool = True,
    network: torch.nn.Module | None = None,
) -> DenoiserFn:
    """A faster D for sampling: autocast to ``precision`` (a key of :data:`PRECISIONS`),
    channels-last activations, network weights stored in the autocast dtype (``cast_weights``: see
    :func:`cast_network_weights`), ``torch.compile`` of the whole denoiser (preconditioning + network), and/or
    :class:`CUDAGraphDenoiser` replay. The sampler's state and
    the preconditioning stay fp32 throughout. With ``cudnn_benchmark``, any of those options and a CUDA
    device, cuDNN times its convolution algorithms on the first call at each shape and keeps the fastest
    (``torch.backends.cudnn.benchmark``, a process-wide switch, as the trainer sets it): a sampler calls the
    network at one shape many times. A plain fp32 D leaves cuDNN's fixed choices alone.
    Works with every sampler and guidance wrapper, since it keeps the D(x, σ, cond) interface.

    ``channels_last`` and ``cast_weights`` convert, in place, the module ``network`` (default: ``model``
    itself); pass the wrapped :class:`~sdeflow.Denoiser` as ``network`` when ``model`` is a guidance wrapper."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose one of {sorted(PRECISIONS)}")
    if cuda_graphs and not torch.cuda.is_available():
        raise ValueError("cuda_graphs=True needs a CUDA device")
    if cast_weights and PRECISIONS[precision] is None:
        raise ValueError("cast_weights needs a reduced precision (bf16 or fp16)")
    faster = PRECISIONS[precision] is not None or compile or cuda_graphs or channels_last
    if cudnn_benchmark and faster and torch.cuda.is_available():  # a plain fp32 D keeps cuDNN's fixed choices
        torch.backends.cudnn.benchmark = True
    module = network if network is not None else model
    if (channels_last or cast_weights) and not isinstance(module, torch.nn.Module):
        raise ValueError("channels_last / cast_weights convert a torch module: pass it as network= (e.g. the Denoiser)")
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if cast_weights:
        cast_network_weights(module, PRECISIONS[precision])  # type: ignore[arg-type]
    fn: DenoiserFn = model
    if PRECISIONS[precision] is not None or channels_last:
        fn = _Autocast(fn, PRECISIONS[precision], cache=not cuda_graphs, channels_last=channels_last)
    if compile:
        fn = torch.compile(fn, mode=compile_mode)
    if cuda_graphs:
        fn = CUDAGraphDenoiser(fn)
    return fn
