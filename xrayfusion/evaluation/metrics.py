"""Scores of branch and fused probabilities: metrics, bootstrap intervals, tables, the predictions CSV layout."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional import classification as tmf

from xrayfusion.core.errors import DataError
from xrayfusion.core.names import FUSED, METRIC_NAMES, RANKING_METRICS, balanced_accuracy, strict_threshold

EVAL_METRICS = METRIC_NAMES


def predictions_frame(
    names: Sequence[str],
    labels: torch.Tensor | None,
    probs_by_model: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
) -> pd.DataFrame:
    """One row per image: name, label, `<model>/<class>` probabilities (the test_predictions.csv layout)."""
    frame = pd.DataFrame({"name": list(names)})
    if labels is not None:
        frame["label"] = labels.numpy().astype(int)
    for model_name, probs in probs_by_model.items():
        for j, cls in enumerate(class_names):
            frame[f"{model_name}/{cls}"] = probs[:, j].numpy()
    return frame


def probs_from_frame(frame: pd.DataFrame, model_name: str = FUSED) -> np.ndarray:
    """The (N, C) probabilities of `model_name` from a predictions_frame."""
    cols = [c for c in frame.columns if c.startswith(f"{model_name}/")]
    if not cols:
        raise DataError(f"predictions have no '{model_name}/<class>' columns; found {list(frame.columns)}")
    return frame[cols].to_numpy(dtype=float)


# ---- metrics -------------------------------------------------------------------------------------------
def _binary_fns(threshold: float) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    kw = {"threshold": strict_threshold(threshold), "validate_args": False}  # torchmetrics decides p > t
    return {
        "acc": lambda p, y: tmf.binary_accuracy(p, y, **kw),
        "precision": lambda p, y: tmf.binary_precision(p, y, **kw),
        "recall": lambda p, y: tmf.binary_recall(p, y, **kw),
        "specificity": lambda p, y: tmf.binary_specificity(p, y, **kw),
        "f1": lambda p, y: tmf.binary_f1_score(p, y, **kw),
        "auroc": lambda p, y: tmf.binary_auroc(p, y, validate_args=False),
        "ap": lambda p, y: tmf.binary_average_precision(p, y, validate_args=False),
        "ece": lambda p, y: tmf.binary_calibration_error(p, y, validate_args=False),
    }


def _multiclass_fns(num_classes: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    kw = {"num_classes": num_classes, "average": "macro", "validate_args": False}
    return {
        "acc": lambda p, y: tmf.multiclass_accuracy(p, y, **{**kw, "average": "micro"}),
        "precision": lambda p, y: tmf.multiclass_precision(p, y, **kw),
        "recall": lambda p, y: tmf.multiclass_recall(p, y, **kw),
        "specificity": lambda p, y: tmf.multiclass_specificity(p, y, **kw),
        "f1": lambda p, y: tmf.multiclass_f1_score(p, y, **kw),
        "auroc": lambda p, y: tmf.multiclass_auroc(p, y, **kw),
        "ap": lambda p, y: tmf.multiclass_average_precision(p, y, **kw),
        "ece": lambda p, y: tmf.multiclass_calibration_error(p, y, num_classes=num_classes, validate_args=False),
    }


def compute_metrics(labels: torch.Tensor, probs: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """METRIC_NAMES: acc (plain), balanced_acc, precision, recall, specificity, f1, auroc, ap, ece; binary, or
    macro averages over classes.

    auroc and ap are NaN when the labels hold one class only.
    """
    labels = labels.long()
    num_classes = probs.shape[1]
    if num_classes == 2:
        fns, scores = _binary_fns(threshold), probs[:, 1].float().contiguous()
    else:
        fns, scores = _multiclass_fns(num_classes), probs
    one_class = len(torch.unique(labels)) < 2
    values = {
        name: (math.nan if one_class and name in RANKING_METRICS else float(fn(scores, labels)))
        for name, fn in fns.items()
    }
    values["balanced_acc"] = balanced_accuracy(values["recall"], values["specificity"], num_classes)
    return {name: values[name] for name in METRIC_NAMES}


def branch_aurocs(labels: torch.Tensor, probs: torch.Tensor, keys: Sequence[str]) -> dict[str, float]:
    """Each branch's AUROC (`compute_metrics`'s) for (N, K, C) branch probabilities, by branch key."""
    return {k: compute_metrics(labels, probs[:, i])["auroc"] for i, k in enumerate(keys)}


def resampled_binary_metrics(
    labels: torch.Tensor, probs: torch.Tensor, threshold: float, counts: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of METRIC_NAMES for many resamples at once (binary tasks): `counts` (B, N) says how often
    each image is in each resample. Equal to `compute_metrics` on each resample, without a loop over them."""
    from scipy import sparse

    y = labels.numpy().astype(bool)
    p = probs[:, 1].float().numpy()
    w = counts.astype(np.float64)
    n = w.sum(axis=1)
    pred = p >= np.float32(threshold)  # the one decision rule, in float32 like predict_labels
    tp, fp = w @ (pred & y), w @ (pred & ~y)
    fn, tn = w @ (~pred & y), w @ (~pred & ~y)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "acc": (tp + tn) / n,
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
            "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), 0.0),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }
        out["balanced_acc"] = (out["recall"] + out["specificity"]) / 2
        # ranking metrics from the weight of positives and negatives at each distinct score
        unique, inverse = np.unique(p, return_inverse=True)
        onehot = sparse.csr_matrix((np.ones(len(p)), (np.arange(len(p)), inverse)), shape=(len(p), len(unique)))
        pos = (sparse.csr_matrix(w * y) @ onehot).toarray()  # (B, K), scores ascending
        neg = (sparse.csr_matrix(w * ~y) @ onehot).toarray()
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each score
        ranked = (pos * (below + 0.5 * neg)).sum(axis=1)
        both = (n_pos > 0) & (n_neg > 0)
        out["auroc"] = np.where(both, ranked / (n_pos * n_neg), np.nan)
        tp_at = np.cumsum(pos[:, ::-1], axis=1)  # thresholds from the highest score down
        fp_at = np.cumsum(neg[:, ::-1], axis=1)
        precision_at = np.where(tp_at + fp_at > 0, tp_at / (tp_at + fp_at), 0.0)
        out["ap"] = np.where(both, (precision_at * pos[:, ::-1]).sum(axis=1) / n_pos, np.nan)
        # 15 equal-width confidence bins, exactly as torchmetrics bins them (float32 edges; 1.0 has its own slot)
        bins = np.searchsorted(torch.linspace(0, 1, 16).numpy(), p, side="right") - 1
        binned = sparse.csr_matrix((np.ones(len(p)), (np.arange(len(p)), bins)), shape=(len(p), 16))
        gap = (sparse.csr_matrix(w * p) @ binned).toarray() - (sparse.csr_matrix(w * y) @ binned).toarray()
        out["ece"] = np.abs(gap).sum(axis=1) / n
    return {name: out[name] for name in METRIC_NAMES}


def resample_counts(n: int, n_resamples: int, seed: int, groups: Sequence[str] | None = None) -> np.ndarray:
    """(n_resamples, n): how often each of n images is in each seeded bootstrap resample. With `groups` (one
    patient id per image) the patients are drawn with replacement and each brings all of its images."""
    rng = np.random.default_rng(seed)
    codes = np.arange(n) if groups is None else np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    units = int(codes.max()) + 1 if n else 0
    counts = np.zeros((n_resamples, units), dtype=np.int64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], rng.integers(0, units, size=(n_resamples, units))), 1)
    return counts[:, codes]


def bootstrap_intervals(
    labels: torch.Tensor,
    probs: torch.Tensor,
    threshold: float,
    n_resamples: int,
    seed: int,
    level: float = 0.95,
    groups: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric over `n_resamples` seeded resamples of the images (of the
    patients, with `groups`: `resample_counts`).

    Binary tasks score all resamples at once (`resampled_binary_metrics`: about a second for 1,000 resamples of
    624 images); more classes loop over `compute_metrics`.
    """
    counts = resample_counts(len(labels), n_resamples, seed, groups)
    draws = _resampled_metrics(labels, probs, threshold, counts)
    return {name: _percentiles(values, level) for name, values in draws.items()}


def paired_difference_interval(
    labels: torch.Tensor,
    probs_a: torch.Tensor,
    probs_b: torch.Tensor,
    metric: str,
    n_resamples: int,
    seed: int,
    level: float = 0.95,
    groups: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric`(a) - `metric`(b) for two models' probabilities of the same
    images, both scored on each of the same seeded resamples (of the patients, with `groups`): a paired interval,
    narrower than comparing the two models' own intervals when their predictions are correlated. A threshold-free
    metric is meant (auroc, ap, ece); thresholded ones are taken at 0.5."""
    counts = resample_counts(len(labels), n_resamples, seed, groups)
    a = _resampled_metrics(labels, probs_a, 0.5, counts)[metric]
    b = _resampled_metrics(labels, probs_b, 0.5, counts)[metric]
    return _percentiles(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), level)


def _resampled_metrics(
    labels: torch.Tensor, probs: torch.Tensor, threshold: float, counts: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric on each resample of `counts` (`resample_counts`); binary tasks all at once."""
    if probs.shape[1] == 2:
        return resampled_binary_metrics(labels, probs, threshold, counts)
    picks = [torch.from_numpy(np.repeat(np.arange(len(labels)), row)) for row in counts]
    rows = [compute_metrics(labels[i], probs[i], threshold) for i in picks]
    return {m: np.asarray([r[m] for r in rows], dtype=float) for m in METRIC_NAMES}


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of the values, NaNs left out (NaN, NaN when none are left)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    alpha = (1.0 - level) / 2.0
    return (float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))) if len(arr) else (math.nan, math.nan)


def evaluate_predictions(
    labels: torch.Tensor,
    probs_by_model: Mapping[str, torch.Tensor],
    threshold: float | Mapping[str, float] = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Rows (model, metric, value, ci_low, ci_high) for every model; intervals are NaN when n_bootstrap=0, and
    resample the patients `groups` names (one per image) when given, else the images.

    `threshold` is one value or one per model name (binary tasks).
    """
    if len(labels) == 0:
        raise DataError("no labelled images to evaluate")
    rows = []
    for model_name, probs in probs_by_model.items():
        threshold_of = threshold.get(model_name, 0.5) if isinstance(threshold, Mapping) else threshold
        values = compute_metrics(labels, probs, threshold_of)
        intervals = (
            bootstrap_intervals(labels, probs, threshold_of, n_bootstrap, seed, groups=groups)
            if n_bootstrap > 0
            else dict.fromkeys(values, (math.nan, math.nan))
        )
        for metric, value in values.items():
            lo, hi = intervals[metric]
            rows.append({"model": model_name, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def mlflow_metrics(results: pd.DataFrame, prefix: str) -> dict[str, float]:
    """`<prefix>/<model>/<metric>` plus `..._ci_low` / `..._ci_high`, finite values only."""
    out: dict[str, float] = {}
    for row in results.itertuples():
        for suffix, value in (("", row.value), ("_ci_low", row.ci_low), ("_ci_high", row.ci_high)):
            if value is not None and math.isfinite(float(value)):
                out[f"{prefix}/{row.model}/{row.metric}{suffix}"] = float(value)
    return out


def results_table(results: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Wide table: one row per model, one `value [low, high]` cell per metric."""

    def cell(row: pd.Series) -> str:
        if not math.isfinite(row.value):
            return "n/a"
        text = f"{row.value:.{digits}f}"
        if math.isfinite(row.ci_low):
            text += f" [{row.ci_low:.{digits}f}, {row.ci_high:.{digits}f}]"
        return text

    cells = results.assign(cell=results.apply(cell, axis=1))
    wide = cells.pivot(index="model", columns="metric", values="cell")
    order = [m for m in results["model"].unique()]
    return wide.loc[order, [m for m in EVAL_METRICS if m in wide.columns]].reset_index()
