"""Evaluation: distances between sample sets, feature spaces with cached reference statistics, the FID Inception
network, and the sample-quality-against-NFE report."""

from ..models.classifier import DatasetClassifier, train_classifier
from .features import cached_classifier, cached_stats, feature_spaces, inception_features
from .metrics import FeatureStats, frechet_distance, mmd2, precision_recall, sliced_wasserstein
from .report import evaluate_generator, evaluate_samplers, write_eval_report

__all__ = [
    "DatasetClassifier",
    "FeatureStats",
    "cached_classifier",
    "cached_stats",
    "evaluate_generator",
    "evaluate_samplers",
    "feature_spaces",
    "frechet_distance",
    "inception_features",
    "mmd2",
    "precision_recall",
    "sliced_wasserstein",
    "train_classifier",
    "write_eval_report",
]
