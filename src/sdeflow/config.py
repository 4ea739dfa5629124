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

import torch
import yaml

from .config_objectives import (
    AutoencoderConfig,
    AutoregressiveConfig,
    FewStepConfig,
    FinetuneConfig,
    FlowConfig,
    GANConfig,
    validate_objective,
)
from .config_train import (
    COMPILE_MODES,
    EMA_KINDS,
    LR_SCHEDULES,
    PARALLEL_STRATEGIES,
    EMAConfig,
    ParallelConfig,
    TrainConfig,
    validate_cuda_graph,
    validate_parallel,
)
from .core.losses import RECIPES, SIGMA_SAMPLERS, WEIGHTINGS
from .core.preconditioning import PARAMETERIZATIONS
from .core.process import PROCESSES
from .data import check_data_config
from .errors import ConfigError
from .models.layers import ATTENTION_BACKENDS, NORM_BACKENDS
from .sampling.acceleration import PRECISIONS
from .sampling.samplers import SPECS
from .sampling.schedules import SCHEDULES

__all__ = [
    "COMPILE_MODES",
    "EMA_KINDS",
    "LR_SCHEDULES",
    "MODEL_KINDS",
    "ON_ERROR",
    "OPTIMIZERS",
    "PARALLEL_STRATEGIES",
    "PRECISIONS",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EMAConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ParallelConfig",
    "SampleConfig",
    "TextConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "save_config",
    "validate",
]

# Allowed values of the fields below. Values that another module owns (recipes, samplers, schedules, processes,
# parameterizations, precisions, datasets, attention backends) are checked against that module's own table.
MODEL_KINDS = ("mlp", "unet", "dit", "mmdit")
ON_ERROR = ("skip", "raise")
OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "radam": "RAdam", "adagrad": "Adagrad"}


@dataclass
class DataConfig:
    name: str = "digits"  # toy:<moons|8gaussians|checkerboard|swissroll|spirals|mixture>, digits, mnist, ...
    path: str | None = None  # for image_folder, cifar10, cifar100, mnist_idx, fashion_mnist_idx, npz
    resolution: int | None = None  # resize (images) / upsample (digits)
    num_samples: int = 20000  # toys
    split: str = "train"
    on_error: str = "skip"  # ON_ERROR: image folders skip or refuse unreadable files
    horizontal_flip: bool = False
    classes: list[int] | None = None  # keep only the images of these labels (labelled in-memory datasets)


@dataclass
class ModelConfig:
    kind: str = "unet"  # MODEL_KINDS
    preset: str | None = "small"
    num_classes: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextConfig:
    # a frozen text encoder: "minilm" (the bundled all-MiniLM-L6-v2) or a transformers save_pretrained folder
    # (CLIP text model, T5 encoder, BERT-style); the dataset's captions condition the model, train.label_dropout
    # drops them (the empty prompt) for classifier-free guidance
    encoder: str | None = None
    max_length: int = 32  # prompts are cut to this many tokens, with a warning


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
    # latent diffusion: an autoencoder checkpoint (a run's step folder, or a diffusers AutoencoderKL folder)
    autoencoder: str | None = None
    cache_latents: bool = False  # encode the data once into safetensors shards under out_dir/latents
    consistency: bool = False  # a consistency model: D(x̃, σ_min) = x̃ (set by objective: consistency)


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
    objective: str = "diffusion"  # config_objectives.OBJECTIVES: diffusion, autoencoder, gan, flow, autoregressive,
    # reflow, consistency
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    autoregressive: AutoregressiveConfig = field(default_factory=AutoregressiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    fewstep: FewStepConfig = field(default_factory=FewStepConfig)

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
    """Types checked while reading, then every value checked against its allowed values (:func:`validate`)."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a YAML mapping at the top level")
    return validate(_from_dict(ExperimentConfig, data))


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


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The torch optimizer ``train.optimizer`` names: a key of :data:`OPTIMIZERS` or a ``torch.optim`` class."""
    cls = getattr(torch.optim, OPTIMIZERS.get(name.lower(), name), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ConfigError(f"train.optimizer: unknown torch optimizer '{name}'")
    return cls


def _one_of(key: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {sorted(allowed)}, got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every value against its allowed values before anything is built or trained; the error names the
    key. Returns ``cfg``. Checks that need the run's world size (batch divisibility by it) stay with the trainer."""
    t, d, s = cfg.train, cfg.diffusion, cfg.sample
    for key, value in (
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("sample.steps", s.steps),
        ("sample.n", s.n),
    ):
        _at_least(key, value, 1)
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.attention_backend", t.attention_backend, ATTENTION_BACKENDS)
    _one_of("train.norm_backend", t.norm_backend, NORM_BACKENDS)
    _one_of("train.compile_mode", t.compile_mode, COMPILE_MODES)
    _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _one_of("train.ema.kind", t.ema.kind, EMA_KINDS)
    if t.ema.kind == "fixed" and not 0 <= t.ema.decay < 1:
        raise ConfigError(f"train.ema.decay must lie in [0, 1), got {t.ema.decay}")
    for key, value in (
        ("train.lr", t.lr),
        ("train.weight_decay", t.weight_decay),
        ("train.warmup_steps", t.warmup_steps),
        ("train.log_every", t.log_every),
        ("train.keep_last", t.keep_last),
        ("train.divergence_factor", t.divergence_factor),
        ("train.divergence_window", t.divergence_window),
        ("train.ema.start_step", t.ema.start_step),
        ("data.num_samples", cfg.data.num_samples),
    ):
        _at_least(key, value, 0)
    if t.ema.kind == "power" and not 0 < t.ema.std < 12**-0.5:  # EDM2's profile needs γ > 0: σ_rel < √(1/12)
        raise ConfigError(f"train.ema.std must lie in (0, 0.2887), got {t.ema.std}")
    if any(not 0 < v < 12**-0.5 for v in t.ema.posthoc) or t.ema.posthoc_every < 1:
        raise ConfigError(f"train.ema.posthoc σ_rel must lie in (0, 0.2887) and posthoc_every be >= 1, got "
                          f"{t.ema.posthoc}, {t.ema.posthoc_every}")  # fmt: skip
    if cfg.data.resolution is not None:
        _at_least("data.resolution", cfg.data.resolution, 2)
    if not 0 <= t.label_dropout < 1:
        raise ConfigError(f"train.label_dropout must lie in [0, 1), got {t.label_dropout}")
    optimizer_class(t.optimizer)
    if t.compile_options:
        if t.compile_mode != "default":
            raise ConfigError("train.compile_options exclude a train.compile_mode other than default")
        from torch._inductor import list_options

        unknown = sorted(set(t.compile_options) - set(list_options()))
        if unknown:
            raise ConfigError(f"train.compile_options: unknown Inductor option(s) {unknown}")
    _one_of("model.kind", cfg.model.kind, MODEL_KINDS)
    _at_least("model.num_classes", cfg.model.num_classes, 0)
    _one_of("diffusion.recipe", d.recipe, RECIPES)
    for key, value, allowed in (
        ("diffusion.process", d.process, PROCESSES),
        ("diffusion.parameterization", d.parameterization, PARAMETERIZATIONS),
        ("diffusion.sigma_sampling", d.sigma_sampling, SIGMA_SAMPLERS),
        ("diffusion.weighting", d.weighting, WEIGHTINGS),
        ("sample.schedule", s.schedule, SCHEDULES),
    ):
        if value is not None:
            _one_of(key, value, allowed)
    _one_of("sample.sampler", s.sampler, SPECS)
    if s.schedule == "optimized":  # a grid belongs to trained weights (sdeflow schedule), not to a run in progress
        raise ConfigError("sample.schedule 'optimized' is computed for a trained checkpoint by `sdeflow schedule`")
    _one_of("data.on_error", cfg.data.on_error, ON_ERROR)
    check_data_config(cfg.data)
    validate_objective(cfg)
    validate_parallel(cfg)
    validate_cuda_graph(cfg, optimizer_class(cfg.train.optimizer))
    _at_least("text.max_length", cfg.text.max_length, 1)
    if cfg.text.encoder and cfg.model.num_classes:
        raise ConfigError("text.encoder and model.num_classes exclude each other: condition on prompts or on labels")
    if cfg.model.kind == "mmdit" and not cfg.text.encoder:
        raise ConfigError("model.kind 'mmdit' is text-conditioned: it needs text.encoder")
    if d.cache_latents and not d.autoencoder:
        raise ConfigError("diffusion.cache_latents needs diffusion.autoencoder (the checkpoint that encodes the data)")
    return cfg
