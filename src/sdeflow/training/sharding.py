"""FSDP2 for the trainer (``train.parallel.strategy: fsdp``): per-block sharding with a mixed-precision policy,
activation checkpointing per block, and the run state of a sharded checkpoint.

FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP") splits every parameter along
dim 0 across the ranks (DTensors); before a block runs, its parameters are all-gathered, after backward its
gradients are reduce-scattered, so each rank holds 1/W of the weights, gradients and Adam moments. The optimizer
and the EMA work on the local slices unchanged (``lerp`` of two identically sharded DTensors is local).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import read_sharded, save_sharded_checkpoint
from ..config import PRECISIONS, ExperimentConfig, TrainConfig

__all__ = ["blocks", "checkpoint_blocks", "restore", "save", "shard", "shard_copy"]


def blocks(net: nn.Module) -> list[nn.Module]:
    """The units that are sharded (and recomputed) one at a time: the outermost composite modules held in a
    ``ModuleList`` / ``ModuleDict`` (a DiT's transformer blocks, a UNet's residual blocks); plain layers beside
    them (embeddings, stem and head) stay with the root."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for _, container in net.named_modules():
        if id(container) in inside or not isinstance(container, (nn.ModuleList, nn.ModuleDict)):
            continue
        for child in container.children():
            if any(True for _ in child.children()) and any(True for _ in child.parameters()):
                found.append(child)
                inside.update(id(m) for m in child.modules())
    return found


def checkpoint_blocks(net: nn.Module) -> None:
    """Activation checkpointing (Chen et al. 2016): each block keeps only its inputs and recomputes its
    activations in backward, trading about a third more compute for memory that no longer grows with depth.
    The block's own ``forward`` is checkpointed, so that FSDP's hooks around the block (gather before, free
    after) stay outside the recomputation, as with a checkpoint wrapper, and the state-dict keys do not change."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks(net):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _mesh(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard(net: nn.Module, t: TrainConfig, device: torch.device) -> nn.Module:
    """``fully_shard`` each block, then the root. bf16 training gathers parameters in bf16 and reduces gradients
    in fp32 (the mixed-precision policy); the root keeps its inputs (x, σ) as they are, so the noise embedding sees
    σ in full precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = PRECISIONS[t.precision]
    mesh, reshard = _mesh(device), t.parallel.reshard_after_forward
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks(net):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    root = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return fully_shard(net, mesh=mesh, mp_policy=root, reshard_after_forward=reshard)


def shard_copy(copy: nn.Module, device: torch.device) -> nn.Module:
    """Shard a copy that follows the trained network (its EMA) exactly as the network, in full precision: its
    slices line up with the network's, and sampling from it (every rank together) gathers fp32 weights."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    for block in blocks(copy):
        fully_shard(block, mesh=mesh)
    return fully_shard(copy, mesh=mesh)


def all_finite(modules: tuple[nn.Module | None, ...], collective: bool = False) -> bool:
    """Whether these modules' parameters are finite; ``collective``: on every rank's slices (all ranks call it)."""
    ok = all(bool(torch.isfinite(_local(p)).all()) for m in modules if m is not None for p in m.parameters())
    if not collective:
        return ok
    flag = torch.tensor(float(ok), device=next(modules[0].parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _tensors(model: nn.Module, ema: nn.Module | None, phases: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """(the sharded tensors of the run: weights, EMA, each phase's optimizer moments; each phase's param_groups)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors: dict[str, Any] = {"model": get_model_state_dict(model), "optimizers": {}}
    if ema is not None:
        tensors["ema"] = get_model_state_dict(ema)
    groups = {}
    for name, phase in phases.items():
        osd = get_optimizer_state_dict(model, phase.optimizer)
        tensors["optimizers"][name], groups[name] = osd["state"], osd["param_groups"]
    return tensors, groups


def save(
    directory: Path, step: int, cfg: ExperimentConfig, objective: Any, phases: dict[str, Any], state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:  # fmt: skip
    """Write sharded checkpoint ``step_<step>`` (collective): the tensors by DCP, ``state`` (LR schedules,
    scalers, RNG, step, losses; see :func:`sdeflow.training.state.save`) with each optimizer's param_groups."""
    model, ema = objective.saved_modules()
    tensors, groups = _tensors(model, ema, phases)
    state = {**state, "param_groups": groups}
    return save_sharded_checkpoint(directory, step, tensors, state, {**meta, "world_size": dist.get_world_size()},
                                   keep_last=cfg.train.keep_last)  # fmt: skip


def restore(ck: dict[str, Any], objective: Any, phases: dict[str, Any]) -> None:
    """Load a sharded checkpoint's weights, EMA and optimizer moments into this rank's slices (any world size:
    DCP reads the saved slices that overlap this rank's), then each optimizer's param_groups."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model, ema = objective.saved_modules()
    target, _ = _tensors(model, ema, phases)
    read_sharded(ck["path"], target)
    set_model_state_dict(model, target["model"])
    if ema is not None:
        set_model_state_dict(ema, target["ema"])
    groups = ck["state"]["param_groups"]
    for name, phase in phases.items():
        osd = {"state": target["optimizers"][name], "param_groups": groups[name]}
        set_optimizer_state_dict(model, phase.optimizer, osd)
