"""Cross-fitting: out-of-fold branch probabilities for every training image (StackingClassifier semantics).

Patient-grouped, class-stratified folds, one `fit_predict` call per fold, each held-out fold predicted by a
model that never saw it. What trains a fold is the caller's (xrayfusion.training.folds: the run's own recipe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from xrayfusion.core.errors import ConfigError
from xrayfusion.data.splits import grouped_folds

FitPredict = Callable[[int, np.ndarray, np.ndarray], torch.Tensor]


def parse_cv(value: Any) -> int | None:
    """fusion.cv: 'holdout' (or null) -> None; an integer K >= 2 -> K."""
    if value is None or str(value).strip().lower() == "holdout":
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 2 or str(k) != str(value).strip():
        raise ConfigError(f"fusion.cv={value!r} must be 'holdout' or a number of folds >= 2, e.g. fusion.cv=5")
    return k


def cross_fit(
    labels: Sequence[int], groups: Sequence[str], n_splits: int, seed: int, fit_predict: FitPredict
) -> tuple[torch.Tensor, np.ndarray]:
    """Out-of-fold predictions (N, ...) and the fold of each row.

    `fit_predict(fold, train_idx, held_out_idx)` must fit on train_idx only and return predictions for
    held_out_idx. Raises RuntimeError if a fold's two sides share an image or a patient.
    """
    labels = np.asarray(labels)
    groups = list(groups)
    oof: torch.Tensor | None = None
    fold_of = np.full(len(labels), -1)
    for fold, (train_idx, held_idx) in enumerate(grouped_folds(labels, groups, n_splits, seed)):
        shared = {groups[i] for i in train_idx} & {groups[i] for i in held_idx}
        if set(train_idx.tolist()) & set(held_idx.tolist()) or shared:
            raise RuntimeError(f"fold {fold}: training and held-out sides share patients {sorted(shared)[:5]}")
        pred = fit_predict(fold, train_idx, held_idx)
        if oof is None:
            oof = torch.zeros((len(labels), *pred.shape[1:]), dtype=pred.dtype)
        oof[torch.as_tensor(held_idx)] = pred
        fold_of[held_idx] = fold
    if oof is None or (fold_of < 0).any():
        raise RuntimeError("cross-fitting left images without an out-of-fold prediction")
    return oof, fold_of
