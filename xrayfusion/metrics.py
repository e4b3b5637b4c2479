"""Metric collections per branch and fused (torchmetrics), binary or macro-averaged multiclass."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
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


def metric_input(probs: torch.Tensor) -> torch.Tensor:
    """What a collection expects: the positive-class probability (binary) or all probabilities."""
    return probs[:, 1].contiguous() if probs.shape[1] == 2 else probs


def predict_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class decisions: positive-class probability >= threshold (binary) or argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).long()
    return probs.argmax(dim=1)
