"""Names and the one decision rule every layer shares."""

from __future__ import annotations

import numpy as np
import torch

FUSED = "fused"  # the fused model's name in metrics (`test/fused/auroc`), tables and prediction columns
# metrics of every branch and the fused model, in the order tables show them
# acc: plain accuracy; balanced_acc: mean per-class recall (binary: (sensitivity + specificity) / 2);
# precision, recall, specificity, f1, auroc and ap are macro averages over classes when there are more than two
METRIC_NAMES = ("acc", "balanced_acc", "precision", "recall", "specificity", "f1", "auroc", "ap", "ece")
RANKING_METRICS = ("auroc", "ap")  # undefined when the labels hold one class only
# how two branches of an ensemble differ, logged as `<prefix>/diversity/<a>__<b>/<metric>` per pair of branches
# and `<prefix>/diversity/mean_<metric>` over all pairs (xrayfusion/evaluation/diversity.py)
DIVERSITY = "diversity"
DIVERSITY_METRICS = ("disagreement", "error_corr")
# a training run's score on validation, what sweep tables, searches and `compare` rank runs on, the param naming the
# metric it was taken from and the param giving its direction (max/min: optimized_mode); training/sweep.py
SELECTION_METRIC = "selection/score"
SELECTION_SOURCE = "selection/source"
SELECTION_MODE = "selection/mode"
# the final (fitted) fusion's AUROC on validation predictions its fit has not seen: the default selection source,
# the one whose scores come with a 95% bootstrap interval over the validation patients (SELECTION_CI)
FUSED_VAL_AUROC = "fusion/val_auroc"
SELECTION_CI = ("selection/score_ci_low", "selection/score_ci_high")
# what a run's training cost, in wall seconds: the fit of the final model, and the cross-fit folds' trainings
FIT_SECONDS = "time/fit_seconds"
CROSSFIT_SECONDS = "time/crossfit_seconds"


def predict_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """THE decision rule: positive when the positive-class probability >= threshold (binary), else argmax.

    Probabilities are compared in float32, as every xrayfusion output is.
    """
    if probs.shape[1] == 2:
        return (probs[:, 1].float() >= float(np.float32(threshold))).long()
    return probs.argmax(dim=1)


def balanced_accuracy(recall: float, specificity: float, num_classes: int) -> float:
    """Balanced accuracy from the (macro) recall and specificity: their mean for two classes, else the macro
    recall itself (the mean per-class recall)."""
    return (recall + specificity) / 2 if num_classes == 2 else recall


def strict_threshold(threshold: float) -> float:
    """The threshold to give a library that decides `p > t` (torchmetrics) so that it decides `p >= threshold`
    on float32 probabilities: the largest float32 below `threshold` (no float32 lies between the two)."""
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
