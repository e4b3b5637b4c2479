"""Figures logged with each run: confusion matrix, ROC curves, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, auc, roc_curve  # noqa: E402

from xrayfusion.core.names import FUSED  # noqa: E402


def confusion_matrix_figure(
    labels: torch.Tensor, predicted: torch.Tensor, class_names: Sequence[str], title: str = FUSED
) -> Figure:
    """Confusion matrix with counts."""
    fig, ax = plt.subplots(figsize=(4 + 0.4 * len(class_names), 4 + 0.4 * len(class_names)))
    ConfusionMatrixDisplay.from_predictions(
        labels.numpy(),
        predicted.numpy(),
        labels=list(range(len(class_names))),
        display_labels=list(class_names),
        ax=ax,
        colorbar=False,
    )
    ax.set_title(f"Test confusion matrix ({title})")
    fig.tight_layout()
    return fig


def roc_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if probs.shape[1] == 2:
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
    else:  # micro-average over one-vs-rest
        onehot = np.eye(probs.shape[1])[labels]
        fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    return fpr, tpr


def roc_figure(labels: torch.Tensor, probs_by_model: Mapping[str, torch.Tensor]) -> Figure:
    """ROC curve of each model (branches and fused) on one plot; micro-averaged for >2 classes."""
    fig, ax = plt.subplots(figsize=(5, 5))
    y = labels.numpy()
    if len(np.unique(y)) > 1:
        for name, probs in probs_by_model.items():
            fpr, tpr = roc_points(y, probs.numpy())
            ax.plot(fpr, tpr, lw=2.5 if name == FUSED else 1.2, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title="Test ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def training_curves_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss and accuracy per epoch (train and validation), like a Keras "history" plot."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [int(h["epoch"]) + 1 for h in history]
    for ax, keys, title in (
        (ax_loss, ("train/loss", "val/loss"), "loss"),
        (ax_acc, ("train/acc", "val/fused/acc"), "accuracy"),
    ):
        for key in keys:
            points = [(e, h[key]) for e, h in zip(epochs, history, strict=True) if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set(xlabel="epoch", title=title)
        ax.legend()
    fig.tight_layout()
    return fig
