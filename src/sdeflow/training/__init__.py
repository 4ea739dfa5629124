"""Training: objectives (what is trained), the deterministic batch stream, the loop, checkpoints of a run, its
logs, optimizers and EMA."""

from ..builders import build_denoiser, build_network, build_recipe
from ..checkpoint import CheckpointError
from .diffusion import DiffusionObjective
from .ema import EMA
from .loop import Trainer, TrainingDivergedError
from .objective import Objective
from .run_log import RunLogger, plot_losses
from .stream import Batch, BatchStream

__all__ = [
    "EMA",
    "Batch",
    "BatchStream",
    "CheckpointError",
    "DiffusionObjective",
    "Objective",
    "RunLogger",
    "Trainer",
    "TrainingDivergedError",
    "build_denoiser",
    "build_network",
    "build_recipe",
    "plot_losses",
]
