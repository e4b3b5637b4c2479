"""The LightningModule's epoch metrics per branch and fused (torchmetrics), binary or macro-averaged multiclass."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    AUROC,
    Accuracy,
    AveragePrecision,
    CalibrationError,
    F1Score,
    Precision,
    Recall,
    Specificity,
)

from xrayfusion.core.names import METRIC_NAMES, balanced_accuracy, predict_labels, strict_threshold


def metric_collection(num_classes: int, prefix: str = "", threshold: float = 0.5) -> MetricCollection:
    """METRIC_NAMES but balanced_acc (derived in `compute_values`): acc (plain), precision, recall (sensitivity),
    specificity, f1, auroc, ap (average precision), ece (calibration error, 15 bins)."""
    if num_classes == 2:
        kw: dict = {"task": "binary", "threshold": strict_threshold(threshold)}  # torchmetrics decides p > t
        ranking: dict = {"task": "binary"}
    else:
        kw = {"task": "multiclass", "num_classes": num_classes, "average": "macro"}
        ranking = {"task": "multiclass", "num_classes": num_classes, "average": "macro"}
    ece_kw = {k: v for k, v in ranking.items() if k != "average"}
    metrics = {
        "acc": Accuracy(**{**kw, "average": "micro"} if num_classes > 2 else kw),
        "precision": Precision(**kw),
        "recall": Recall(**kw),
        "specificity": Specificity(**kw),
        "f1": F1Score(**kw),
        "auroc": AUROC(**ranking),
        "ap": AveragePrecision(**ranking),
        "ece": CalibrationError(n_bins=15, **ece_kw),
    }
    assert (*metrics, "balanced_acc") == (*[m for m in METRIC_NAMES if m != "balanced_acc"], "balanced_acc")
    return MetricCollection(metrics, prefix=prefix)


def compute_values(collection: MetricCollection, num_classes: int) -> dict[str, torch.Tensor]:
    """The collection's values with `<prefix>balanced_acc` added: every name of METRIC_NAMES."""
    values = collection.compute()
    prefix = collection.prefix or ""
    values[f"{prefix}balanced_acc"] = balanced_accuracy(
        values[f"{prefix}recall"], values[f"{prefix}specificity"], num_classes
    )
    return values


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
