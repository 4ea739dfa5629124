"""The ``train`` section of an experiment config: optimisation, EMA, precision and speed switches, and how the
processes of a ``torchrun`` launch share the work (``train.parallel``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "COMPILE_MODES",
    "EMA_KINDS",
    "LR_SCHEDULES",
    "PARALLEL_STRATEGIES",
    "EMAConfig",
    "ParallelConfig",
    "TrainConfig",
    "validate_cuda_graph",
    "validate_parallel",
]

LR_SCHEDULES = ("constant", "cosine", "linear")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EMA_KINDS = ("fixed", "power", "none")
PARALLEL_STRATEGIES = ("ddp", "fsdp")
FSDP_OBJECTIVES = ("diffusion", "reflow")  # one trained network and its EMA, no frozen copy of it beside


@dataclass
class EMAConfig:
    kind: str = "fixed"  # EMA_KINDS: fixed, power (EDM2) or none
    decay: float = 0.999
    std: float = 0.05  # EDM2 relative std of the power-function profile
    start_step: int = 0
    # post-hoc EMA (EDM2 §3): power-function profiles of these σ_rel tracked beside it, snapshots every posthoc_every
    # steps in <out_dir>/ema_snapshots; `sdeflow ema RUN --sigma-rel ...` reconstructs any σ_rel after training
    posthoc: list[float] = field(default_factory=list)
    posthoc_every: int = 1000


@dataclass
class ParallelConfig:
    """How several processes (torchrun) train one model. ``ddp``: every rank holds the whole model, optimizer state
    and EMA, and gradients are all-reduced. ``fsdp``: FSDP2 (``fully_shard``) per block: parameters, gradients,
    Adam moments and EMA are split across the ranks (each holds 1/W), gathered block by block for forward and
    backward; checkpoints are sharded (``torch.distributed.checkpoint``) and resume on any number of ranks."""

    strategy: str = "ddp"  # PARALLEL_STRATEGIES
    # fsdp: free each block's gathered parameters after its forward (ZeRO-3); false keeps them until backward
    # (ZeRO-2 like: more memory, one all-gather less per block)
    reshard_after_forward: bool = True


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    optimizer: str = "adamw"  # a key of OPTIMIZERS or any torch.optim class name
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # LR_SCHEDULES
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema: EMAConfig = field(default_factory=EMAConfig)
    precision: str = "fp32"  # PRECISIONS
    compile: bool = False
    compile_mode: str = "default"  # COMPILE_MODES (torch.compile's)
    # Inductor options for torch.compile instead of a mode, e.g. {coordinate_descent_tuning: true}
    compile_options: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False  # NHWC activations for convolutional networks on the GPU
    fused_optimizer: bool = True  # one fused kernel for the optimizer step on the GPU (Adam, AdamW, SGD)
    attention_backend: str = "auto"  # sdeflow.models.layers.ATTENTION_BACKENDS; auto: cuDNN on Hopper
    norm_backend: str = "auto"  # sdeflow.models.layers.NORM_BACKENDS; auto: our Triton GroupNorm / adaLN on CUDA
    # recompute each block's activations in backward instead of keeping them: less memory, about a third more compute
    activation_checkpointing: bool = False
    # replay the whole step (forward, backward, clipping, optimizer, EMA) from one CUDA graph: no host overhead
    cuda_graph: bool = False
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    label_dropout: float = 0.0
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 50
    sample_every: int = 0
    ckpt_every: int = 500
    keep_last: int = 3
    tensorboard: bool = True
    # divergence guard: stop when a loss exceeds divergence_factor × the median of the last divergence_window
    # losses (checked once that many are known; 0 turns the spike check off; NaN/Inf always stop the run)
    divergence_factor: float = 1000.0
    divergence_window: int = 100


def validate_cuda_graph(cfg: Any, optimizer: type) -> None:
    """``train.cuda_graph``: what a captured step cannot hold is refused by name (the objective, the device and
    the number of processes are checked when the trainer starts); ``optimizer``: the class ``train.optimizer``
    names."""
    t = cfg.train
    if not t.cuda_graph:
        return
    why = []
    if t.precision == "fp16":
        why.append("train.precision fp16 (its loss scaler skips steps on the host: use bf16)")
    if t.compile and t.compile_mode in ("reduce-overhead", "max-autotune"):
        why.append(f"train.compile_mode '{t.compile_mode}' (it replays graphs of its own: use default or "
                   "max-autotune-no-cudagraphs)")  # fmt: skip
    if "capturable" not in optimizer.__init__.__code__.co_varnames:
        why.append(f"train.optimizer '{t.optimizer}' (its step cannot be captured: use adam or adamw)")
    if t.parallel.strategy == "fsdp":
        why.append("train.parallel.strategy 'fsdp'")
    if cfg.finetune.prior_weight > 0:
        why.append("finetune.prior_weight > 0 (the prior images are picked on the host)")
    if why:
        raise ConfigError("train.cuda_graph does not support " + "; ".join(why))


def validate_parallel(cfg: Any) -> None:
    """``train.parallel``: a known strategy, and FSDP only where its sharded state is handled: one trained network
    with its EMA (objectives diffusion and reflow, full fine-tuning), bf16 or fp32 (fp16's loss scaler is not
    sharded), no post-hoc EMA snapshots (their trackers are whole copies on rank 0)."""
    t = cfg.train
    if t.parallel.strategy not in PARALLEL_STRATEGIES:
        raise ConfigError(f"train.parallel.strategy must be one of {list(PARALLEL_STRATEGIES)}, "
                          f"got {t.parallel.strategy!r}")  # fmt: skip
    if t.parallel.strategy != "fsdp":
        return
    why = []
    if cfg.objective not in FSDP_OBJECTIVES:
        why.append(f"objective '{cfg.objective}' (fsdp trains {', '.join(FSDP_OBJECTIVES)})")
    if cfg.finetune.method != "full":
        why.append(f"finetune.method '{cfg.finetune.method}' (adapters on a frozen base: use ddp)")
    if cfg.finetune.prior_weight > 0:
        why.append("finetune.prior_weight > 0 (the prior images are drawn from the whole base on one process)")
    if t.precision == "fp16":
        why.append("train.precision fp16 (use bf16: its loss scaler is not sharded)")
    if t.ema.posthoc:
        why.append("train.ema.posthoc (its snapshots are whole copies: use ddp)")
    if why:
        raise ConfigError("train.parallel.strategy 'fsdp' does not support " + "; ".join(why))
