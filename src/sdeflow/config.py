"""Experiment configuration: YAML files validated into typed dataclasses.

Unknown keys and values of the wrong type are errors that name the key (``train.lr: expected a float,
got 'fast'``). Any value can be overridden from the command line with ``--set section.key=value`` (the value
is parsed as YAML). The resolved configuration is saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EMAConfig",
    "ExperimentConfig",
    "ModelConfig",
    "SampleConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key or file."""


@dataclass
class DataConfig:
    name: str = "digits"  # toy:<moons|8gaussians|checkerboard|swissroll|spirals|mixture>, digits, mnist, ...
    path: str | None = None  # for image_folder, cifar10, cifar100, mnist_idx, fashion_mnist_idx, npz
    resolution: int | None = None  # resize (images) / upsample (digits)
    num_samples: int = 20000  # toys
    split: str = "train"
    on_error: str = "skip"  # image folders: 'skip' or 'raise' on unreadable files
    horizontal_flip: bool = False


@dataclass
class ModelConfig:
    kind: str = "unet"  # mlp | unet | dit
    preset: str | None = "small"
    num_classes: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    recipe: str = "edm"
    process: str | None = None
    process_kwargs: dict[str, Any] = field(default_factory=dict)
    parameterization: str | None = None
    sigma_sampling: str | None = None
    weighting: str | None = None
    sigma_data: float = 0.5
    time_scale: float | None = None  # default: 1000 for processes on t ∈ [0, 1], else 1


@dataclass
class EMAConfig:
    kind: str = "fixed"  # fixed | power (EDM2) | none
    decay: float = 0.999
    std: float = 0.05  # EDM2 relative std of the power-function profile
    start_step: int = 0


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema: EMAConfig = field(default_factory=EMAConfig)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | ...
    # Inductor options for torch.compile instead of a mode, e.g. {coordinate_descent_tuning: true}
    compile_options: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False  # NHWC activations for convolutional networks on the GPU
    fused_optimizer: bool = True  # one fused kernel for the optimizer step on the GPU (Adam, AdamW, SGD)
    attention_backend: str = "auto"  # auto (cuDNN on Hopper) | default | cudnn | flash | efficient | math
    label_dropout: float = 0.0
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 50
    sample_every: int = 0
    ckpt_every: int = 500
    keep_last: int = 3
    tensorboard: bool = True


@dataclass
class SampleConfig:
    sampler: str = "heun"
    steps: int = 18
    n: int = 64
    schedule: str | None = None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    out_dir: str = "runs/experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '2e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value  # Any


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key '{where}' (allowed in {prefix or 'the top level'}: {sorted(names)})")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError("a config must be a YAML mapping at the top level")
    return _from_dict(ExperimentConfig, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
