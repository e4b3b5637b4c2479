"""Patient ids from Kaggle file names and patient-grouped, class-stratified splits."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from xrayfusion.core.errors import ConfigError

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person123_bacteria_456.jpeg
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE),  # IM-0117-0001, NORMAL2-IM-0012-0001
)


def patient_id(filename: str) -> str:
    """The patient a Kaggle chest_xray file belongs to; the file stem when the name has no patient."""
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def grouped_folds(
    labels: Sequence[int], groups: Sequence[str], n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train_idx, held_out_idx) folds; each group on one side only, classes stratified."""
    labels = np.asarray(labels)
    n_groups = len(set(groups))
    if n_splits < 2 or n_splits > n_groups:
        raise ConfigError(
            f"cannot make {n_splits} patient-grouped folds from {n_groups} patients; use between 2 and {n_groups} folds"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups=list(groups)))


def carve_validation(
    labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val) with about `fraction` of the patients in val."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_fraction={fraction} must lie strictly between 0 and 1, e.g. 0.15")
    n_splits = max(2, round(1.0 / fraction))
    train_idx, val_idx = grouped_folds(labels, groups, n_splits, seed)[0]
    return np.sort(train_idx), np.sort(val_idx)
