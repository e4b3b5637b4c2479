"""One decision rule (p >= t) everywhere: predict_labels, the LightningModule's metrics, evaluate's metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrayfusion.core.names import METRIC_NAMES, predict_labels, strict_threshold
from xrayfusion.evaluation.metrics import compute_metrics
from xrayfusion.fusion import thresholds
from xrayfusion.models.metrics import compute_values, metric_collection


def _two_class(p1: list[float]) -> torch.Tensor:
    p = torch.tensor(p1, dtype=torch.float32)
    return torch.stack([1 - p, p], dim=1)


def _collection_recall(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    collection = metric_collection(2, "test/fused/", 0.5)
    thresholds.set_threshold(collection, threshold)
    collection.update(probs[:, 1], labels)
    return float(compute_values(collection, 2)["test/fused/recall"])


def test_strict_threshold_is_the_float32_just_below() -> None:
    for t in (0.0, 0.3, 0.5, 0.95, 1.0):
        below = strict_threshold(t)
        assert np.float32(below) < np.float32(t)
        assert np.nextafter(np.float32(below), np.float32(np.inf)) == np.float32(t)


@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.950000047])
def test_ties_are_positive_in_every_path(threshold: float) -> None:
    t32 = float(np.float32(threshold))
    probs = _two_class([t32, t32, np.nextafter(np.float32(t32), np.float32(0)), 0.01])  # two ties, one just below
    labels = torch.tensor([1, 1, 1, 0])
    assert predict_labels(probs, threshold).tolist() == [1, 1, 0, 0]
    assert compute_metrics(labels, probs, threshold)["recall"] == pytest.approx(2 / 3)
    assert _collection_recall(probs, labels, threshold) == pytest.approx(2 / 3)


def test_saturated_validation_gives_threshold_one_and_every_path_agrees() -> None:
    val = _two_class([1.0, 1.0, 1.0, 0.2, 0.6])  # every positive saturates at 1.0
    val_labels = torch.tensor([1, 1, 1, 0, 0])
    t = thresholds.choose_threshold("youden", val[:, 1], val_labels)
    assert t == 1.0
    test = _two_class([1.0, 1.0, 0.999, 0.5])
    test_labels = torch.tensor([1, 1, 1, 0])
    decided = predict_labels(test, t)
    assert decided.tolist() == [1, 1, 0, 0]  # saturated positives are positive, not recall 0
    assert compute_metrics(test_labels, test, t)["recall"] == pytest.approx(2 / 3)
    assert _collection_recall(test, test_labels, t) == pytest.approx(2 / 3)


def test_sensitivity_target_holds_by_its_own_rule_in_the_logged_metrics() -> None:
    rng = np.random.default_rng(0)
    p = np.round(rng.random(400), 2).astype(np.float32)  # many ties
    labels = torch.from_numpy((rng.random(400) < p).astype(np.int64))
    probs = _two_class(p.tolist())
    t = thresholds.choose_threshold("sensitivity@0.95", probs[:, 1], labels)
    own = float((predict_labels(probs, t)[labels == 1] == 1).float().mean())
    assert own >= 0.95
    assert compute_metrics(labels, probs, t)["recall"] == pytest.approx(own)
    assert _collection_recall(probs, labels, t) == pytest.approx(own)


def test_metric_names_are_one_list_and_multiclass_acc_is_plain_accuracy() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 8 + [[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0] * 6 + [1, 1] + [1, 2])  # 8 of 10 right; recalls: class 0 1, class 1 1/3, class 2 1
    values = compute_metrics(labels, probs)
    assert tuple(values) == METRIC_NAMES
    assert values["acc"] == pytest.approx(0.8)
    assert values["balanced_acc"] == pytest.approx((1 + 1 / 3 + 1) / 3)  # the mean per-class recall
    collection = metric_collection(3, "val/x/")
    collection.update(probs, labels)
    logged = compute_values(collection, 3)
    assert {k.split("/")[-1] for k in logged} == set(METRIC_NAMES)
    assert float(logged["val/x/acc"]) == pytest.approx(0.8)
    assert float(logged["val/x/balanced_acc"]) == pytest.approx((1 + 1 / 3 + 1) / 3)
