"""``sdeflow demo``: train a small class-conditional model on the bundled 8×8 digits and measure it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .evaluation.metrics import FeatureStats, frechet_distance
from .models.classifier import train_classifier

if TYPE_CHECKING:
    from .training import Trainer

__all__ = ["digits_demo_metrics"]


def digits_demo_metrics(trainer: Trainer, n_per_class: int = 100) -> dict[str, float]:
    """Class-conditional samples → accuracy of a classifier trained on the real digits (is the requested digit
    drawn?) and the classifier-feature Fréchet distance to the real digits."""
    ds = trainer.dataset
    clf = train_classifier(ds.x, ds.y)
    real_acc = float((clf.batched(ds.x, "forward").argmax(1) == ds.y).float().mean())
    n = n_per_class * max(1, trainer.cfg.model.num_classes)
    samples, labels = trainer.objective.generate(n, seed=trainer.cfg.seed + 1)
    x = samples.float().cpu().clamp(-1, 1)
    fd = frechet_distance(FeatureStats.of(clf.batched(x)), FeatureStats.of(clf.batched(ds.x)))
    out = {"classifier_accuracy_on_real": real_acc, "fd_classifier_features": fd, "n_samples": n}
    if labels is not None:
        out["class_accuracy_of_samples"] = float((clf.batched(x, "forward").argmax(1) == labels.cpu()).float().mean())
    return out
