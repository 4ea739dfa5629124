"""Where a run executes: device, rank and world size under torchrun, and the wrapping of the modules that run
forward passes: activation checkpointing, DDP or FSDP2 (``train.parallel``), then ``torch.compile``."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, TrainConfig
from ..models.layers import set_attention_backend, set_norm_backend
from . import sharding

__all__ = ["Runtime"]


def check_gpu(device: torch.device, local_rank: int, world: int) -> None:
    """Refuse, naming the cause, a CUDA device this process cannot have: no GPU at all, or a local rank beyond the
    host's GPUs (torchrun --nproc_per_node larger than the GPU count)."""
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{device}' but this machine has no usable CUDA GPU (train.device: auto)")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else 0
    if index >= count:
        who = f"rank {local_rank} of {world} on this host (LOCAL_RANK)" if world > 1 else f"train.device '{device}'"
        raise ConfigError(f"{who} needs GPU {index}, but this host has {count}: start at most {count} processes "
                          "per host (torchrun --nproc_per_node)")  # fmt: skip


@dataclass
class Runtime:
    """Device and process group of this process (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK). ``sharded``: an
    FSDP2 run (then even one process gets a process group, of one rank, so the run and its checkpoints are the
    same at every world size)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    sharded: bool = False
    owns_group: bool = False
    synced: list[nn.Module] = field(default_factory=list)  # DDP / FSDP modules whose gradient sync we control

    @classmethod
    def start(cls, t: TrainConfig) -> Runtime:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if t.device == "auto":
            device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(t.device)
        if device.type == "cuda":
            check_gpu(device, local_rank, world)
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
            set_attention_backend(t.attention_backend, device)
        set_norm_backend(t.norm_backend)
        sharded, owns = t.parallel.strategy == "fsdp", False
        if (world > 1 or sharded) and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if world > 1:
                dist.init_process_group(backend)
            else:  # one process: a group of one rank, rendezvous in memory
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            owns = True
        return cls(device, rank, world, sharded, owns)

    def wrapper(self, t: TrainConfig, static_graph: bool = False):
        """``wrap(module)``: activation checkpointing per block; then FSDP2 per block (``train.parallel``) or DDP
        across the processes (``static_graph``: the same parameters get gradients at every step); then
        ``torch.compile``. Wrapped modules are recorded for :meth:`accumulating`."""

        def wrap(module: nn.Module) -> nn.Module:
            if t.activation_checkpointing:
                sharding.checkpoint_blocks(module)
            if self.sharded:
                module = sharding.shard(module, t, self.device)
                self.synced.append(module)
            elif self.world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                # gradients live in the all-reduce buckets (no copy between them and .grad)
                module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             gradient_as_bucket_view=True, static_graph=static_graph)  # fmt: skip
                self.synced.append(module)
            if not t.compile:
                return module
            if t.compile_options:
                return torch.compile(module, options=dict(t.compile_options))
            return torch.compile(module, mode=None if t.compile_mode == "default" else t.compile_mode)

        return wrap

    @contextmanager
    def accumulating(self, skip_sync: bool) -> Iterator[None]:
        """Inside, with ``skip_sync``, backward only accumulates local gradients: no all-reduce (DDP ``no_sync``)
        or reduce-scatter (FSDP) until the last micro-batch of a step."""
        if not skip_sync:
            yield
            return
        with ExitStack() as stack:
            for m in self.synced:
                if self.sharded:
                    m.set_requires_gradient_sync(False)
                    stack.callback(m.set_requires_gradient_sync, True)
                else:
                    stack.enter_context(m.no_sync())
            yield

    def close(self, release: callable) -> None:
        """Leave a distributed run cleanly: every rank waits for the others, the DDP wrappers (which hold the
        process group and its reducer) are released by ``release()``, then the group is destroyed; destroying
        it while DDP still referenced it could abort a rank at exit. A no-op in a single process."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            release()
            self.synced.clear()
            gc.collect()
            dist.destroy_process_group()
