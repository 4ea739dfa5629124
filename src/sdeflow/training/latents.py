"""The data of latent diffusion (Rombach et al. 2022, §3–4): images encoded by a frozen autoencoder.

Diffusion trains on z·c with z drawn from the autoencoder's posterior and c its scaling factor (1/std of the
latents, stored in the autoencoder checkpoint). What the encoder computes for an image, the posterior's moments, is
the same every time, so it can be computed once: with ``diffusion.cache_latents`` the dataset is encoded into
safetensors shards under ``<out_dir>/latents/<key>/`` (the key hashes the autoencoder's weights and the data
config), written atomically and reused by later runs; the objective then draws z from the cached moments with the
same noise it would draw on the fly, so both give the same training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..builders import load_autoencoder
from ..checkpoint import CheckpointError
from ..config import ConfigError, ExperimentConfig
from ..data import ArrayImageDataset
from ..models.autoencoder import Autoencoder

__all__ = ["cache_key", "encode_moments", "latent_data"]

SHARD = 4096  # images per safetensors shard


@torch.no_grad()
def encode_moments(ae: Autoencoder, x: Tensor, device: torch.device, batch: int = 256) -> Tensor:
    """The posterior moments of every image of ``x`` (on the CPU), encoded ``batch`` at a time on ``device``."""
    return torch.cat([ae.moments(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def cache_key(ae: Autoencoder, cfg: ExperimentConfig) -> str:
    """SHA-256 (16 hex digits) of the autoencoder's weights and the data config: a cache never mixes data."""
    data = json.dumps(cfg.to_dict()["data"], sort_keys=True)
    return hashlib.sha256(f"{ae.fingerprint()} {data}".encode()).hexdigest()[:16]


def _load_cache(folder: Path) -> tuple[Tensor, Tensor]:
    from safetensors.torch import load_file

    parts = [load_file(p) for p in sorted(folder.glob("shard_*.safetensors"))]
    if not parts:
        raise CheckpointError(f"latent cache {folder} holds no shards: delete the folder to encode again")
    return torch.cat([p["moments"] for p in parts]), torch.cat([p["labels"] for p in parts])


def _write_cache(folder: Path, moments: Tensor, labels: Tensor) -> None:
    """Shards written into a temporary folder, then renamed into place: a crash leaves no partial cache."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=folder.parent))
    try:
        for k, i in enumerate(range(0, len(moments), SHARD)):
            save_file({"moments": moments[i : i + SHARD].contiguous(), "labels": labels[i : i + SHARD].contiguous()},
                      tmp / f"shard_{k:05d}.safetensors")  # fmt: skip
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latent_data(
    cfg: ExperimentConfig, dataset: Dataset, device: torch.device, out_dir: Path
) -> tuple[Dataset, Autoencoder, tuple[int, ...], bool]:
    """(the dataset diffusion trains on, the frozen autoencoder, the latent shape, whether the data are cached
    moments) for ``diffusion.autoencoder``; errors name the field."""
    d = cfg.diffusion
    image_shape = tuple(dataset.shape)  # type: ignore[attr-defined]
    ae = load_autoencoder(d.autoencoder, device=device)  # type: ignore[arg-type]
    if image_shape[0] != ae.in_channels:
        raise ConfigError(
            f"diffusion.autoencoder {d.autoencoder} encodes {ae.in_channels}-channel images, but data "
            f"'{cfg.data.name}' has shape {image_shape}"
        )
    try:
        shape = ae.latent_shape(image_shape)
    except ValueError as e:
        raise ConfigError(f"diffusion.autoencoder {d.autoencoder}: {e} (data shape {image_shape})") from None
    kw = cfg.model.kwargs
    for key, want in (("in_channels", shape[0]), ("img_resolution", shape[1]), ("input_size", shape[1])):
        if key in kw and kw[key] != want:
            raise ConfigError(
                f"model.kwargs.{key} = {kw[key]} does not fit the latents of diffusion.autoencoder "
                f"{d.autoencoder}: shape {shape} (leave it unset to follow the autoencoder)"
            )
    if not d.cache_latents:
        return dataset, ae, shape, False
    if not hasattr(dataset, "x"):
        raise ConfigError("diffusion.cache_latents needs a dataset held in memory (not an image folder)")
    if getattr(dataset, "horizontal_flip", False):
        raise ConfigError("diffusion.cache_latents cannot apply data.horizontal_flip (flips act on images)")
    folder = out_dir / "latents" / cache_key(ae, cfg)
    if folder.is_dir():
        moments, labels = _load_cache(folder)
    else:
        moments, labels = encode_moments(ae, dataset.x, device), dataset.y.cpu()  # type: ignore[attr-defined]
        _write_cache(folder, moments, labels)
    if len(moments) != len(dataset):  # type: ignore[arg-type]
        raise CheckpointError(f"latent cache {folder} holds {len(moments)} items, the data {len(dataset)}")  # type: ignore[arg-type]
    return ArrayImageDataset(moments, labels), ae, shape, True
