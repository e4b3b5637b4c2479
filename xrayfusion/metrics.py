"""Metric collections per branch and fused (torchmetrics), binary or macro-averaged multiclass."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    AUROC,
    Accuracy,
    CalibrationError,
    F1Score,
    Precision,
    Recall,
    Specificity,
)

METRIC_NAMES = ("acc", "precision", "recall", "specificity", "f1", "auroc", "ece")


def metric_collection(num_classes: int, prefix: str = "", threshold: float = 0.5) -> MetricCollection:
    """acc, precision, recall (sensitivity), specificity, f1, auroc, ece (calibration error, 15 bins)."""
    if num_classes == 2:
        kw: dict = {"task": "binary", "threshold": threshold}
        auroc = AUROC(task="binary")
        ece = CalibrationError(task="binary", n_bins=15)
    else:
        kw = {"task": "multiclass", "num_classes": num_classes, "average": "macro"}
        auroc = AUROC(task="multiclass", num_classes=num_classes, average="macro")
        ece = CalibrationError(task="multiclass", num_classes=num_classes, n_bins=15)
    return MetricCollection(
        {
            "acc": Accuracy(**kw),
            "precision": Precision(**kw),
            "recall": Recall(**kw),
            "specificity": Specificity(**kw),
            "f1": F1Score(**kw),
            "auroc": auroc,
            "ece": ece,
        },
        prefix=prefix,
    )


class _DecidedAccuracy(Metric):
    """Accuracy from probabilities without host syncs (no input checks), for every training step."""

    full_state_update = False

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += (predict_labels(probs, self.threshold) == target).sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


def train_accuracy(num_classes: int, threshold: float = 0.5) -> Metric:
    """Accuracy of (B, C) probabilities updated on device with no `.item()`: torchmetrics' own
    binary accuracy checks its inputs on the host every update, a sync per training step."""
    return _DecidedAccuracy(threshold if num_classes == 2 else 0.5)


def metric_input(probs: torch.Tensor) -> torch.Tensor:
    """What a collection expects: the positive-class probability (binary) or all probabilities."""
    return probs[:, 1].contiguous() if probs.shape[1] == 2 else probs


def predict_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class decisions: positive-class probability >= threshold (binary) or argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).long()
    return probs.argmax(dim=1)
