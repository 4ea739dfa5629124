"""Feature spaces for Fréchet distances, and the one cache of their reference statistics.

Two spaces: the standard FID Inception network (2048-D pool features) and a small classifier trained on the
dataset itself (fast on a CPU, and meaningful for data Inception never saw, such as 8×8 digits). The classifier's
weights and both spaces' statistics of the real data are computed once per dataset and cached on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.classifier import DatasetClassifier, train_classifier
from .metrics import FeatureStats

__all__ = ["cached_classifier", "cached_stats", "feature_spaces", "inception_features"]

FeatureFn = Callable[[Tensor], Tensor]


def cached_stats(path: Path, features: Callable[[], Tensor], refresh: bool = False) -> FeatureStats:
    """The statistics stored at ``path`` (a plain .npz), or those of ``features()``, then stored there."""
    if path.is_file() and not refresh:
        return FeatureStats.load(path)
    stats = FeatureStats.of(features())
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def cached_classifier(
    x: Tensor, y: Tensor, cache_dir: Any, name: str, device: Any = "cpu"
) -> tuple[DatasetClassifier, FeatureStats]:
    """The dataset classifier (on ``device``) and the real data's statistics in its feature space, trained once
    and cached as ``{name}_classifier.safetensors`` and ``{name}_stats.npz`` in ``cache_dir``."""
    from safetensors.torch import load_file, save_file

    from ..checkpoint import load_weights

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    wfile = cache / f"{name}_classifier.safetensors"
    if wfile.is_file():
        clf = DatasetClassifier(tuple(x.shape[1:]), int(y.max()) + 1)
        load_weights(clf, load_file(wfile), str(wfile))
        clf = clf.to(device).eval()
        fresh = False
    else:
        clf = train_classifier(x, y, device=device)
        save_file({k: v.contiguous().cpu() for k, v in clf.state_dict().items()}, wfile)
        fresh = True  # statistics of another classifier's features would be meaningless
    return clf, cached_stats(cache / f"{name}_stats.npz", lambda: clf.batched(x), refresh=fresh)


def inception_features(weights: str | Path | None, device: Any, batch: int = 100) -> FeatureFn:
    """x in [-1, 1] → the FID Inception network's 2048-D features (float64, on the CPU)."""
    from .inception import load_fid_inception

    net = load_fid_inception(weights, device)

    @torch.no_grad()
    def features(x: Tensor) -> Tensor:
        return torch.cat([net(((x[i : i + batch] + 1) / 2).to(device)).double().cpu() for i in range(0, len(x), batch)])

    return features


def feature_spaces(
    x: Tensor,
    y: Tensor | None,
    cache_dir: Path,
    name: str,
    device: Any,
    inception: bool = False,
    inception_weights: str | Path | None = None,
) -> tuple[dict[str, FeatureFn], dict[str, FeatureStats], dict[str, Tensor]]:
    """(feature functions, reference statistics, real features) by space: ``classifier`` where the data have
    labels, ``inception`` when asked for. Real features feed precision / recall."""
    fns: dict[str, FeatureFn] = {}
    reference: dict[str, FeatureStats] = {}
    real: dict[str, Tensor] = {}
    name = name.replace(":", "_")
    if y is not None and int(y.max()) >= 0:
        clf, reference["classifier"] = cached_classifier(x, y, cache_dir, name, device)
        fns["classifier"] = clf.batched
        real["classifier"] = clf.batched(x)
    if inception:
        fns["inception"] = inception_features(inception_weights, device)
        reference["inception"] = cached_stats(cache_dir / f"{name}_inception_stats.npz", lambda: fns["inception"](x))
    return fns, reference, real
