"""Decision thresholds of binary tasks: a fixed value, Youden's J, or a target sensitivity, chosen on validation."""

from __future__ import annotations

import re

import numpy as np
import torch
from sklearn.metrics import roc_curve
from torchmetrics import MetricCollection

from xrayfusion.core.errors import ConfigError
from xrayfusion.core.names import strict_threshold

_SENSITIVITY = re.compile(r"^sensitivity@(0?\.\d+|1(?:\.0*)?)$")
_HELP = "use metrics.threshold=0.5 (any number in (0, 1)), youden or sensitivity@0.95"


def parse_rule(rule: float | str) -> float | str:
    """A fixed threshold (float in (0, 1)), 'youden' or 'sensitivity@<target>'; ConfigError otherwise."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        value = float(rule)
    else:
        text = str(rule).strip().lower()
        if text == "youden" or _SENSITIVITY.match(text):
            if text != "youden" and not 0.0 < float(text.split("@")[1]) <= 1.0:
                raise ConfigError(f"metrics.threshold={rule!r}: the sensitivity target must lie in (0, 1]; {_HELP}")
            return text
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"metrics.threshold={rule!r} is unknown; {_HELP}") from None
    if not 0.0 < value < 1.0:
        raise ConfigError(f"metrics.threshold={rule!r} must lie strictly between 0 and 1; {_HELP}")
    return value


def initial_threshold(rule: float | str) -> float:
    """The threshold to use before one is chosen: the fixed value, or 0.5 for a rule."""
    parsed = parse_rule(rule)
    return parsed if isinstance(parsed, float) else 0.5


def choose_threshold(rule: float | str, scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """The threshold `rule` gives on validation scores (positive-class probabilities) and labels.

    youden: maximises sensitivity + specificity - 1. sensitivity@t: the highest threshold whose sensitivity
    reaches t (so specificity is as high as that allows). Positive means score >= threshold.
    """
    parsed = parse_rule(rule)
    if isinstance(parsed, float):
        return parsed
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        raise ConfigError(
            f"metrics.threshold={rule} needs validation images of both classes; got only class {labels[:1].tolist()}"
        )
    fpr, tpr, cuts = roc_curve(labels, scores, drop_intermediate=False)
    if parsed == "youden":
        idx = int(np.argmax(tpr - fpr))
    else:
        target = float(parsed.split("@")[1])
        idx = int(np.argmax(tpr >= target - 1e-12))
    return float(np.clip(cuts[idx], 0.0, 1.0))


def set_threshold(collection: MetricCollection, threshold: float) -> None:
    """Make every thresholded metric of a binary collection decide p >= `threshold` (AUROC and ECE have none)."""
    for metric in collection.values(copy_state=False):
        if hasattr(metric, "threshold"):
            metric.threshold = strict_threshold(threshold)
