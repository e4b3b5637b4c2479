"""How differently the branches of an ensemble decide: pairwise disagreement and error correlation.

Fusion can only gain where branches differ: two branches that give the same labels (disagreement 0) or make
their mistakes on the same images (error correlation near 1) fuse into what either gives alone. Computed from
predictions a run already makes (its validation predictions after the fusion fit, its test report), at each
branch's own decision threshold, with the one decision rule (`predict_labels`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from xrayfusion.core.names import DIVERSITY, predict_labels


def pair_name(a: str, b: str) -> str:
    """The metric key of a pair of branches: `<a>__<b>`."""
    return f"{a}__{b}"


def error_correlation(errors_a: torch.Tensor, errors_b: torch.Tensor) -> float:
    """Pearson correlation of two 0/1 error indicators (the phi coefficient); NaN when either is constant
    (a branch right on every image, or wrong on every image)."""
    a, b = errors_a.double(), errors_b.double()
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum()) / denominator if denominator > 0 else math.nan


def branch_diversity(
    labels: torch.Tensor, probs: torch.Tensor, keys: Sequence[str], thresholds: Mapping[str, float] | None = None
) -> dict[str, float]:
    """For every pair of branches (in `keys` order): `<a>__<b>/disagreement` (the fraction of images whose
    predicted labels differ) and `<a>__<b>/error_corr` (the correlation of their 0/1 errors); plus
    `mean_disagreement` and `mean_error_corr` over the pairs (NaN pairs left out). {} for fewer than two branches.

    `probs` (N, K, C) are branch probabilities; labels are decided at `thresholds[key]` (binary; default 0.5)
    or by argmax (more classes).
    """
    if len(keys) < 2 or len(labels) == 0:
        return {}
    labels = labels.long().cpu()
    decided = [predict_labels(probs[:, i].cpu(), float((thresholds or {}).get(k, 0.5))) for i, k in enumerate(keys)]
    errors = [d != labels for d in decided]
    out: dict[str, float] = {}
    disagreements, correlations = [], []
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            name = pair_name(keys[i], keys[j])
            disagreements.append(float((decided[i] != decided[j]).double().mean()))
            correlations.append(error_correlation(errors[i], errors[j]))
            out[f"{name}/disagreement"], out[f"{name}/error_corr"] = disagreements[-1], correlations[-1]
    finite = [c for c in correlations if math.isfinite(c)]
    out["mean_disagreement"] = sum(disagreements) / len(disagreements)
    out["mean_error_corr"] = sum(finite) / len(finite) if finite else math.nan
    return out


def diversity_metrics(
    prefix: str,
    labels: torch.Tensor,
    probs: torch.Tensor,
    keys: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """`branch_diversity` as MLflow metrics `<prefix>/diversity/<name>`, finite values only."""
    return as_metrics(prefix, branch_diversity(labels, probs, keys, thresholds))


def as_metrics(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    """`branch_diversity` values as MLflow metrics `<prefix>/diversity/<name>`, finite values only."""
    return {f"{prefix}/{DIVERSITY}/{k}": v for k, v in values.items() if math.isfinite(v)}
