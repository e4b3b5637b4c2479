"""Cross-fitting: out-of-fold branch probabilities for every training image (StackingClassifier semantics).

Patient-grouped, class-stratified folds, one `fit_predict` call per fold, each held-out fold predicted by a
model that never saw it. What trains a fold is the caller's (xrayfusion.training.folds: the run's own recipe).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from xrayfusion.core.errors import ConfigError
from xrayfusion.data.splits import grouped_folds

FitPredict = Callable[[int, np.ndarray, np.ndarray], torch.Tensor]
AUTO = "auto"


def parse_cv(value: Any) -> int | str | None:
    """fusion.cv: 'holdout' (or null) -> None; an integer K >= 2 -> K; 'auto' -> 'auto' (see `choose_cv`)."""
    if value is None or str(value).strip().lower() == "holdout":
        return None
    if str(value).strip().lower() == AUTO:
        return AUTO
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 2 or str(k) != str(value).strip():
        raise ConfigError(f"fusion.cv={value!r} must be 'holdout', 'auto' or a number of folds >= 2, e.g. fusion.cv=5")
    return k


def auto_settings(value: Any) -> tuple[float, int]:
    """fusion.auto_cv {saturated_at, folds} as (float, int); ConfigError naming the fix for bad values."""
    value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"fusion.auto_cv={value!r} must be a mapping of saturated_at and folds, e.g. "
            "fusion.auto_cv.saturated_at=0.995 fusion.auto_cv.folds=5"
        )
    saturated_at, folds = value.get("saturated_at", 0.995), value.get("folds", 5)
    if isinstance(saturated_at, bool) or isinstance(folds, bool):
        raise ConfigError(f"fusion.auto_cv={dict(value)} takes numbers, e.g. saturated_at: 0.995, folds: 5")
    try:
        saturated = float(saturated_at)
    except (TypeError, ValueError):
        saturated = -1.0
    try:
        k = int(folds)
    except (TypeError, ValueError):
        k = -1
    if not 0.5 < saturated <= 1.0:
        raise ConfigError(
            f"fusion.auto_cv.saturated_at={saturated_at!r} must be a validation AUROC in (0.5, 1], e.g. 0.995"
        )
    if k == 1 or k < 0 or str(k) != str(folds).strip():
        raise ConfigError(
            f"fusion.auto_cv.folds={folds!r} must be 0 (keep the fusion unfitted: equal weights) or a number "
            "of folds >= 2, e.g. 5"
        )
    return saturated, k


def best_branch(branch_aurocs: Mapping[str, float]) -> tuple[str, float] | None:
    """The branch with the highest defined (not NaN) validation AUROC and that AUROC; None when none is defined."""
    defined = {k: v for k, v in branch_aurocs.items() if v == v}
    if not defined:
        return None
    best = max(defined, key=lambda k: defined[k])
    return best, defined[best]


def choose_cv(branch_aurocs: Mapping[str, float], saturated_at: float, folds: int) -> tuple[int | None, str]:
    """fusion.cv=auto: where to fit the fusion, from the branches' validation AUROCs, and why.

    When the best branch already ranks the validation split (almost) perfectly (AUROC >= `saturated_at`),
    validation holds too few mistakes to learn from: a fusion fitted there learns to copy that branch. Then the
    fusion is fitted on `folds`-fold out-of-fold predictions of the training split (0: not fitted, equal
    weights). Otherwise validation is informative and the fusion is fitted there (None: holdout)."""
    found = best_branch(branch_aurocs)
    if found is None:
        return None, "validation AUROC undefined (one class in validation): fitted on validation"
    best, top = found
    if top < saturated_at:
        return None, f"validation informative: best branch {best} val AUROC {top:.4f} < {saturated_at}"
    where = f"{folds}-fold out-of-fold predictions" if folds else "no fit (equal weights)"
    return folds or 0, f"validation saturated: best branch {best} val AUROC {top:.4f} >= {saturated_at}: {where}"


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
