"""The fusion phase's decisions that need no training: the warning before a fit on a saturated validation split,
and fusion.prefer_equal's choice between learned and equal weights."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from xrayfusion.evaluation.inference import Predictions
from xrayfusion.training.fusion_phase import _warn_if_saturated


def _val(separation: float) -> Predictions:
    """Two branches on 40 validation images: `a` separates the classes by `separation`, `b` is noise."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 20)
    a = (labels * separation + torch.rand(40, generator=gen)).clamp(0, 1)
    b = torch.rand(40, generator=gen)
    p = torch.stack([a, b], dim=1)
    probs = torch.stack([1 - p, p], dim=2)
    return Predictions(probs.log(), probs, probs.mean(1), labels, ("a", "b"))


@pytest.mark.parametrize(("separation", "warned"), [(1.0, True), (0.2, False)])
def test_a_fit_on_a_saturated_validation_split_is_warned_about(caplog, separation: float, warned: bool) -> None:
    cfg = OmegaConf.create({"fusion": {"name": "average", "auto_cv": {"saturated_at": 0.995, "folds": 5}}})
    with caplog.at_level(logging.WARNING, logger="xrayfusion.training.fusion_phase"):
        _warn_if_saturated(cfg, SimpleNamespace(keys=("a", "b")), _val(separation))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert len(lines) == 1 and "saturated validation split (best branch a val AUROC 1.0000 >= 0.995)" in lines[0]
        assert "fusion.cv=auto" in lines[0]
    else:
        assert lines == []


class _Logger:
    """What the fusion phase logs to, kept in dicts."""

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.metrics: dict[str, float] = {}

    def log_hyperparams(self, params) -> None:
        self.params.update(params)

    def log_metrics(self, metrics) -> None:
        self.metrics.update(metrics)


@pytest.mark.parametrize(
    ("noise_b", "calibrated", "kept"),
    # with temperatures fitted on validation both scores are cross-fitted over them too; the outcome is whatever
    # the logged interval says (a noise branch's temperature flattens it, which favours the equal average)
    [(False, False, "none"), (True, False, "holdout"), (True, True, None)],
)
def test_prefer_equal_keeps_equal_weights_only_when_validation_cannot_tell_them_apart(
    noise_b: bool, calibrated: bool, kept: str | None
) -> None:
    import functools

    from xrayfusion.evaluation.metrics import compute_metrics
    from xrayfusion.models import FusionClassifier
    from xrayfusion.training import fusion_phase

    gen = torch.Generator().manual_seed(0)
    n = 200
    labels = torch.tensor([0, 1] * (n // 2))
    groups = [f"p{i}" for i in range(n)]

    def branch(signal: float) -> torch.Tensor:
        return torch.sigmoid(signal * (2 * labels - 1) + torch.randn(n, generator=gen))

    # two equally good branches with independent errors, or a good one and pure noise
    p = torch.stack([branch(2.0), branch(0.0 if noise_b else 2.0)], dim=1)
    probs = torch.stack([1 - p, p], dim=2)
    model = FusionClassifier(
        ["small_cnn", "small_cnn"],
        num_classes=2,
        fusion={"name": "average", "weights": "learned"},
        image_size=16,
        optimizer=functools.partial(torch.optim.SGD, lr=1e-2),
    )

    before = Predictions(probs.log(), probs, probs.mean(1), labels, tuple(model.keys))  # under equal weights
    params = model.fusion.fit(probs, labels, names=model.keys)
    model.hparams.fusion_fitted_on = "holdout"
    if calibrated:
        model.hparams.calibrated_on = "val"
    learned = model.fusion.weights.clone()
    logger = _Logger()
    cfg = OmegaConf.create({"metrics": {"bootstrap": 200}})
    val, fitted_on, logged = fusion_phase._prefer_equal(cfg, model, before, 64, groups, logger, params)
    metrics = logger.metrics
    low, high = metrics["fusion/learned_minus_equal_ci_low"], metrics["fusion/learned_minus_equal_ci_high"]
    assert low <= metrics["fusion/learned_val_auroc"] - metrics["fusion/equal_val_auroc"] <= high
    kept = kept or ("none" if low <= 0 else "holdout")
    assert fitted_on == kept == model.hparams.fusion_fitted_on
    assert (low <= 0) == (kept == "none")  # equal weights unless validation shows the learned ones better
    if kept == "none":
        assert torch.equal(model.fusion.weights, torch.full((2,), 0.5)) and set(logged.values()) == {0.5}
        assert logger.params["fusion/prefer_equal_choice"].startswith("equal weights: validation cannot tell")
        plain = float(compute_metrics(labels, probs.mean(1))["auroc"])
        # fitted on nothing, its score is the plain validation AUROC; with temperatures, cross-fitted over them
        assert (metrics["fusion/equal_val_auroc"] == pytest.approx(plain, abs=1e-9)) != calibrated
    else:
        assert torch.equal(model.fusion.weights, learned) and logged == params
        assert logger.params["fusion/prefer_equal_choice"].startswith("learned weights: better than equal ones")
    assert torch.equal(val.fused, model.fusion(probs, [])[0])  # the predictions of the weights kept
