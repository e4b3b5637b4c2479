"""Temperature scaling, ECE, learned average weights and validation-chosen thresholds."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from xrayfusion.core.errors import ConfigError
from xrayfusion.fusion import calibration, thresholds
from xrayfusion.fusion.checks import validate_fusion
from xrayfusion.fusion.strategies import AverageFusion, build_fusion
from xrayfusion.models.metrics import metric_collection


def test_temperature_recovers_overconfidence_and_lowers_ece() -> None:
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 2, generator=gen) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=gen).squeeze(1)
    overconfident = true_logits * 3  # a branch 3x too sure of itself
    t = calibration.fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    before = calibration.expected_calibration_error(overconfident.softmax(1), labels)
    after = calibration.expected_calibration_error((overconfident / t).softmax(1), labels)
    assert after < before / 2
    temps = calibration.fit_temperatures(torch.stack([overconfident, true_logits], dim=1), labels)
    assert temps.shape == (2,) and temps[1] == pytest.approx(1.0, rel=0.15)
    assert calibration.temperature_params(["a", "b"], temps)["calibration/temperature_a"] == round(float(temps[0]), 6)


def test_learned_weights_favour_the_informative_branch() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (500,), generator=gen)
    good = torch.nn.functional.one_hot(y, 2).float() * 0.7 + 0.15
    noise = torch.rand(500, 2, generator=gen).softmax(1)
    fusion = build_fusion({"name": "average", "weights": "learned"}, 2, 2, [4, 4])
    assert isinstance(fusion, AverageFusion) and fusion.needs_fit
    params = fusion.fit(torch.stack([noise, good], dim=1), y, names=["noise", "good"])
    w = fusion.weights
    assert torch.all(w >= 0) and float(w.sum()) == pytest.approx(1.0)
    assert params["average/weight_good"] > 0.9 and params["average/weight_noise"] < 0.1
    assert not AverageFusion(2, 2, weights=[1, 1]).needs_fit
    with pytest.raises(ConfigError, match="fusion.weights='learn'"):
        AverageFusion(2, 2, weights="learn")


def test_threshold_rules() -> None:
    assert thresholds.parse_rule(0.3) == 0.3 and thresholds.parse_rule("Youden") == "youden"
    assert thresholds.initial_threshold("sensitivity@0.95") == 0.5
    for bad in ("best", 1.5, "sensitivity@2", "sensitivity@"):
        with pytest.raises(ConfigError, match="metrics.threshold"):
            thresholds.parse_rule(bad)
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.12), 0, 1)
    youden = thresholds.choose_threshold("youden", scores, labels)
    assert 0.4 < youden < 0.6
    t95 = thresholds.choose_threshold("sensitivity@0.95", scores, labels)
    sensitivity = (scores[labels == 1] >= t95).mean()
    assert sensitivity >= 0.95 and (scores[labels == 1] >= t95 + 1e-3).mean() < 0.95 + 1 / 200  # the highest such
    assert thresholds.choose_threshold(0.7, scores, labels) == 0.7


def test_set_threshold_changes_the_test_collection() -> None:
    probs = torch.tensor([0.2, 0.4, 0.6, 0.8])
    labels = torch.tensor([0, 1, 1, 1])
    collection = metric_collection(2, "test/x/", threshold=0.5)
    thresholds.set_threshold(collection, 0.3)
    collection.update(probs, labels)
    out = collection.compute()
    assert float(out["test/x/recall"]) == 1.0 and float(out["test/x/acc"]) == 1.0
    assert "test/x/ece" in out


def test_validate_fusion_options() -> None:
    def cfg(**fusion):
        return OmegaConf.create({"fusion": {"name": "stacking", **fusion}, "metrics": {"threshold": 0.5}})

    validate_fusion(cfg(cv=5, meta="hgb"), 2)
    with pytest.raises(ConfigError, match="fusion.cv='five'"):
        validate_fusion(cfg(cv="five"), 2)
    with pytest.raises(ConfigError, match="fusion.cv=1"):
        validate_fusion(cfg(cv=1), 2)
    with pytest.raises(ConfigError, match="fusion.meta='svm'"):
        validate_fusion(cfg(meta="svm"), 2)
    with pytest.raises(ConfigError, match="only applies to fitted fusions"):
        validate_fusion(OmegaConf.create({"fusion": {"name": "voting", "cv": 3}, "metrics": {"threshold": 0.5}}), 2)
    with pytest.raises(ConfigError, match="fusion.calibrate"):
        validate_fusion(cfg(calibrate="yes"), 2)
