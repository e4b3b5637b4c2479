"""Branch diversity: pairwise disagreement and error correlation, on hand-made decisions."""

from __future__ import annotations

import math

import pytest
import torch

from xrayfusion.evaluation.diversity import branch_diversity, diversity_metrics


def branch_probs(*positive: list[float]) -> torch.Tensor:
    """(N, K, 2) probabilities from each branch's positive-class probabilities."""
    p = torch.tensor(positive).T
    return torch.stack([1 - p, p], dim=2)


LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
PROBS = branch_probs(
    [0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.4],  # a at 0.5: 0 0 0 1 1 1 1 0 -> wrong on images 3 and 7
    [0.1, 0.2, 0.35, 0.4, 0.9, 0.8, 0.25, 0.31],  # b at 0.3: 0 0 1 1 1 1 0 1 -> wrong on images 2, 3 and 6
    [0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9],  # c at 0.5: always right
)
THRESHOLDS = {"a": 0.5, "b": 0.3, "c": 0.5}


def test_disagreement_and_error_correlation_of_hand_made_decisions() -> None:
    got = branch_diversity(LABELS, PROBS, ["a", "b", "c"], THRESHOLDS)
    assert got["a__b/disagreement"] == 3 / 8  # images 2, 6 and 7
    assert got["a__c/disagreement"] == 2 / 8 and got["b__c/disagreement"] == 3 / 8
    # errors a = 00010001, b = 00110010: both wrong 1, only a 1, only b 2, both right 4
    assert got["a__b/error_corr"] == pytest.approx((1 * 4 - 1 * 2) / math.sqrt(2 * 6 * 3 * 5), abs=1e-12)
    assert math.isnan(got["a__c/error_corr"]) and math.isnan(got["b__c/error_corr"])  # c never errs
    assert got["mean_disagreement"] == pytest.approx(1 / 3)
    assert got["mean_error_corr"] == got["a__b/error_corr"]  # the undefined pairs are left out
    # identical branches: no disagreement, errors perfectly correlated
    same = branch_diversity(LABELS, PROBS[:, [0, 0]], ["a", "a2"], {"a": 0.5, "a2": 0.5})
    assert same == {
        "a__a2/disagreement": 0.0,
        "a__a2/error_corr": 1.0,
        "mean_disagreement": 0.0,
        "mean_error_corr": 1.0,
    }


def test_diversity_metrics_names_and_one_branch() -> None:
    logged = diversity_metrics("val", LABELS, PROBS, ["a", "b", "c"], THRESHOLDS)
    assert logged["val/diversity/a__b/disagreement"] == 3 / 8
    assert "val/diversity/a__c/error_corr" not in logged  # NaN is not logged
    assert set(logged) >= {"val/diversity/mean_disagreement", "val/diversity/mean_error_corr"}
    assert diversity_metrics("test", LABELS, PROBS[:, :1], ["a"], THRESHOLDS) == {}
    # more than two classes: argmax decides
    three = torch.eye(3)[[0, 1, 2, 0]][:, None, :].repeat(1, 2, 1)
    three[3, 1] = torch.tensor([0.1, 0.8, 0.1])
    assert branch_diversity(torch.tensor([0, 1, 2, 0]), three, ["x", "y"])["x__y/disagreement"] == 1 / 4
