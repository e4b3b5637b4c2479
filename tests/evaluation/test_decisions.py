"""Thresholds are chosen on data the fitted fusion did not see, and the run says which data."""

from __future__ import annotations

import torch

from tests.evaluation.test_evaluation import tiny_model
from xrayfusion.evaluation import decisions
from xrayfusion.evaluation.inference import Predictions
from xrayfusion.fusion import thresholds
from xrayfusion.fusion.strategies import StackingFusion


def _val(n: int = 120) -> tuple[Predictions, list[str]]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    signal = labels.float()[:, None] * torch.tensor([1.5, 0.5]) + torch.randn(n, 2, generator=gen)
    p1 = torch.sigmoid(signal)
    probs = torch.stack([1 - p1, p1], dim=2)  # (N, K=2, C=2)
    fused = probs.mean(1)
    groups = [f"p{i // 2}" for i in range(n)]  # two images per patient
    return Predictions(torch.log(probs), probs, fused, labels, ("small_cnn", "darknet")), groups


def test_a_fusion_fitted_on_validation_gets_its_threshold_from_crossfitted_predictions(monkeypatch) -> None:
    model = tiny_model("stacking")
    val, groups = _val()
    model.fusion.fit(val.probs, val.labels, names=model.keys)
    model.hparams.fusion_fitted_on = "holdout"
    seen: list[set[int]] = []
    original = StackingFusion.fit

    def recording_fit(self, probs, labels, names=None):
        rows = {int(i) for i in torch.nonzero((val.probs[:, None] == probs[None]).all(-1).all(-1))[:, 0]}
        seen.append(rows)
        return original(self, probs, labels, names)

    monkeypatch.setattr(StackingFusion, "fit", recording_fit)
    fused = decisions.crossfit_fused(model, val, groups, seed=0)
    assert len(seen) == 5
    for fitted_on in seen:  # each copy predicts rows it was not fitted on
        held = set(range(len(val))) - fitted_on
        assert held and all(groups[i] not in {groups[j] for j in fitted_on} for i in held)
    monkeypatch.setattr(StackingFusion, "fit", original)

    chosen, where = decisions.choose_thresholds("youden", model, val, groups, seed=0)
    assert where == "val_crossfit5"
    assert chosen["fused"] == thresholds.choose_threshold("youden", fused[:, 1], val.labels)
    assert chosen["small_cnn"] == thresholds.choose_threshold("youden", val.probs[:, 0, 1], val.labels)


def test_a_fusion_not_fitted_on_validation_chooses_on_validation() -> None:
    val, groups = _val()
    for fusion, fitted_on in (("stacking", "oof_cv5"), ("average", None)):
        model = tiny_model(fusion)
        model.hparams.fusion_fitted_on = fitted_on
        chosen, where = decisions.choose_thresholds("youden", model, val, groups, seed=0)
        assert where == "val"
        assert chosen["fused"] == thresholds.choose_threshold("youden", val.fused[:, 1], val.labels)
    fixed, where = decisions.choose_thresholds(0.3, tiny_model("stacking"), val, groups, seed=0)
    assert fixed == {"small_cnn": 0.3, "darknet": 0.3, "fused": 0.3} and where == "val"


def test_too_few_validation_patients_fall_back_in_sample_and_say_so() -> None:
    model = tiny_model("stacking")
    val, _ = _val(8)
    model.fusion.fit(val.probs, val.labels, names=model.keys)
    model.hparams.fusion_fitted_on = "holdout"
    chosen, where = decisions.choose_thresholds("youden", model, val, ["p0"] * 8, seed=0)  # one patient
    assert where == "val_in_sample"
    assert chosen["fused"] == thresholds.choose_threshold("youden", val.fused[:, 1], val.labels)


def test_the_final_fusion_is_scored_on_validation_predictions_its_fit_has_not_seen() -> None:
    val, groups = _val(60)
    model = tiny_model("stacking")
    model.fusion.fit(val.probs, val.labels, names=model.keys)
    model.hparams.fusion_fitted_on = "holdout"
    fused, on = decisions.held_out_fused(model, val, groups, seed=3)
    assert on == "val_crossfit5" and torch.equal(fused, decisions.crossfit_fused(model, val, groups, 3))
    assert not torch.allclose(fused, val.fused)  # not the in-sample predictions of the stored fit
    for fitted_on in ("oof_cv5", "none"):  # fitted elsewhere (or not at all): validation is out of sample
        model.hparams.fusion_fitted_on = fitted_on
        assert decisions.held_out_fused(model, val, groups, seed=3) == (val.fused, "val")
