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
    largest_class = int(np.bincount(labels).max()) if labels.size else 0
    if n_splits > largest_class:  # StratifiedGroupKFold's own check, raised as a ValueError with a traceback
        raise ConfigError(
            f"cannot make {n_splits} class-stratified folds when no class has more than {largest_class} images; "
            f"use between 2 and {largest_class} folds or more data"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups=list(groups)))


def carve_validation(
    labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val): `fraction` of the images in val, to within one patient, whole patients
    on one side only, class proportions kept (patients are stratified by their majority class)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_fraction={fraction} must lie strictly between 0 and 1, e.g. 0.15")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    by_class: dict[int, list[str]] = {}
    for g in sorted(rows):
        majority = int(np.bincount(labels[rows[g]]).argmax())
        by_class.setdefault(majority, []).append(g)
    val: list[int] = []
    for c in sorted(by_class):
        patients = [by_class[c][i] for i in rng.permutation(len(by_class[c]))]
        target = fraction * sum(len(rows[g]) for g in patients)
        taken = 0
        for g in patients:
            if taken and abs(taken + len(rows[g]) - target) >= abs(taken - target):
                continue  # this patient would move the count further from the target: try a smaller one
            val += rows[g]
            taken += len(rows[g])
    val_idx = np.sort(np.asarray(val, dtype=int))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    if len(train_idx) == 0:
        raise ConfigError(f"data.val_fraction={fraction} leaves no patient for training; use a smaller fraction")
    return train_idx, val_idx
