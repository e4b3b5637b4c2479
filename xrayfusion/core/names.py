"""Names and the one decision rule every layer shares."""

from __future__ import annotations

import torch

FUSED = "fused"  # the fused model's name in metrics (`test/fused/auroc`), tables and prediction columns
# metrics of every branch and the fused model, in the order tables show them
METRIC_NAMES = ("acc", "precision", "recall", "specificity", "f1", "auroc", "ap", "ece")
RANKING_METRICS = ("auroc", "ap")  # undefined when the labels hold one class only


def predict_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class decisions: positive-class probability >= threshold (binary) or argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).long()
    return probs.argmax(dim=1)
