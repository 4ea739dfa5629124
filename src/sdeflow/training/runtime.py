"""Where a run executes: device, rank and world size under torchrun, and the DDP / compile wrapping of the
modules that run forward passes."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, TrainConfig
from ..models.layers import set_attention_backend

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
    """Device and process group of this process (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    ddp_modules: list[nn.Module] = field(default_factory=list)

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
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(device, rank, world)

    def wrapper(self, t: TrainConfig):
        """``wrap(module)``: DDP across the processes (recorded for ``no_sync``), then ``torch.compile``."""

        def wrap(module: nn.Module) -> nn.Module:
            if self.world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                # gradients live in the all-reduce buckets (no copy between them and .grad)
                module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             gradient_as_bucket_view=True)  # fmt: skip
                self.ddp_modules.append(module)
            if not t.compile:
                return module
            if t.compile_options:
                return torch.compile(module, options=dict(t.compile_options))
            return torch.compile(module, mode=None if t.compile_mode == "default" else t.compile_mode)

        return wrap

    def close(self, release: callable) -> None:
        """Leave a distributed run cleanly: every rank waits for the others, the DDP wrappers (which hold the
        process group and its reducer) are released by ``release()``, then the group is destroyed; destroying
        it while DDP still referenced it could abort a rank at exit. A no-op in a single process."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            release()
            self.ddp_modules.clear()
            gc.collect()
            dist.destroy_process_group()
