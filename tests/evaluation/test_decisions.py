"""Thresholds are chosen on data the fitted fusion did not see, and the run says which data."""

from __future__ import annotations

import pytest
import torch

from tests.evaluation.test_evaluation import tiny_model
from xrayfusion.data.splits import grouped_folds
from xrayfusion.evaluation import decisions
from xrayfusion.evaluation.inference import Predictions, predict
from xrayfusion.fusion import calibration, thresholds
from xrayfusion.fusion.strategies import StackingFusion
from xrayfusion.models import FusionClassifier


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


def _calibrated_val(model, n: int = 120) -> tuple[Predictions, list[str]]:
    """Validation predictions of two test-time views whose branch probabilities come from the model's
    temperatures, fused as the model fuses views."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % 2
    signal = labels.float()[:, None, None] * torch.tensor([3.0, 1.0]) + torch.randn(n, 2, 2, generator=gen)
    logits = torch.stack([-signal, signal], dim=3)  # (N, V=2, K=2, C=2)
    views = calibration.view_probs(logits, model.temperature)
    groups = [f"p{i // 2}" for i in range(n)]
    return Predictions(
        logits[:, 0], views.mean(1), decisions.fuse_views(model.fusion, views), labels, model.keys, logits
    ), groups


def _tta_model(fusion: str) -> FusionClassifier:
    torch.manual_seed(0)
    return FusionClassifier(
        branches=["small_cnn", "darknet"], num_classes=2, fusion={"name": fusion}, image_size=32, tta="flips"
    ).eval()


def test_temperatures_fitted_on_validation_are_cross_fitted_with_the_fusion(monkeypatch) -> None:
    model = tiny_model("average")  # equal weights: only the temperatures were fitted on validation
    model.temperature.copy_(torch.tensor([2.0, 0.5]))
    model.hparams.calibrated_on = "val"  # what fusion.calibrate=true records
    val, groups = _calibrated_val(model)
    fitted_rows: list[set[int]] = []
    original = calibration.fit_temperatures

    def recording_fit(logits, labels):
        rows = {int(i) for i in torch.nonzero((val.logits[:, None] == logits[None]).all(-1).all(-1))[:, 0]}
        fitted_rows.append(rows)
        return original(logits, labels)

    monkeypatch.setattr(calibration, "fit_temperatures", recording_fit)
    fused, on = decisions.held_out_fused(model, val, groups, seed=0)
    assert on == "val_crossfit5" and len(fitted_rows) == 5
    for fold, (fit_idx, held_idx) in zip(fitted_rows, grouped_folds(val.labels.tolist(), groups, 5, 0), strict=True):
        assert fold == set(fit_idx)  # each fold's temperatures are fitted without its held-out patients
        temps = original(val.logits[fit_idx], val.labels[fit_idx])
        expected = calibration.view_probs(val.view_logits[held_idx], temps).mean((1, 2))  # both views, refitted T
        assert torch.allclose(fused[held_idx], expected, atol=1e-6)
    assert not torch.allclose(fused, val.fused)  # not the predictions of the temperatures fitted on all of them
    monkeypatch.setattr(calibration, "fit_temperatures", original)
    chosen, where = decisions.choose_thresholds("youden", model, val, groups, seed=0)
    assert where == "val_crossfit5" and chosen["fused"] == thresholds.choose_threshold(
        "youden", fused[:, 1], val.labels
    )
    del model.hparams["calibrated_on"]  # a run without fusion.calibrate (or trained before it was recorded)
    assert decisions.held_out_fused(model, val, groups, seed=0) == (val.fused, "val")


def test_temperatures_that_cannot_change_the_fused_ranking_are_not_cross_fitted() -> None:
    concat = tiny_model("concat")  # its fused head reads the branch features, not the temperature-scaled probabilities
    torch.manual_seed(0)
    single = FusionClassifier(branches=["small_cnn"], num_classes=2, fusion={"name": "average"}, image_size=32)
    for model in (concat, single):  # one binary branch, one view: its probability is monotone in its logit
        model.hparams.calibrated_on = "val"
        assert not decisions.calibrated_on_val(model)
    torch.manual_seed(0)
    single_tta = FusionClassifier(
        branches=["small_cnn"], num_classes=2, fusion={"name": "average"}, image_size=32, tta="flips"
    )
    single_tta.hparams.calibrated_on = "val"  # the mean over views is not monotone in one logit
    assert decisions.calibrated_on_val(single_tta)


@pytest.mark.parametrize("fusion", ["voting", "stacking"])
def test_the_cross_fit_fuses_test_time_views_as_the_model_does(fusion: str) -> None:
    model = _tta_model(fusion)
    model.temperature.copy_(torch.tensor([1.7, 0.6]))
    images = torch.randint(0, 256, (40, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # untrained heads give nearly constant logits: spread and centre them so views disagree
        for head in model.heads.values():
            head.weight.mul_(3000.0)
        spread = predict(model, images).view_logits
        for i, head in enumerate(model.heads.values()):
            head.bias.sub_(spread[:, :, i].mean((0, 1)))
    labels = torch.arange(40) % 2
    if fusion == "stacking":
        model.fusion.fit(predict(model, images).probs, labels, names=model.keys)
    out = predict(model, images)
    assert out.view_logits is not None and out.view_logits.shape == (40, 2, 2, 2)
    assert torch.equal(out.view_logits[:, 0], out.logits)
    views = calibration.view_probs(out.view_logits, model.temperature)
    assert torch.allclose(views.mean(1), out.probs, atol=1e-6)  # the model's branch probabilities
    assert torch.allclose(decisions.fuse_views(model.fusion, views), out.fused, atol=1e-6)  # and its fused ones
    with torch.no_grad():
        of_the_mean = model.fusion(out.probs, [])[0].float()
    assert not torch.allclose(of_the_mean, out.fused, atol=1e-6)  # fusing the views' mean is another model
    # nothing refitted (the fusion not fitted on validation, temperatures not recorded as fitted there): the
    # cross-fit gives back the model's own fused predictions
    val = Predictions(out.logits, out.probs, out.fused, labels, out.keys, out.view_logits)
    groups = [f"p{i}" for i in range(40)]
    assert torch.allclose(decisions.crossfit_fused(model, val, groups, seed=0), out.fused, atol=1e-6)


@pytest.mark.parametrize("tta", ["none", "flips_scales"])
def test_refusing_the_branch_outputs_gives_what_predicting_again_gives(tta: str) -> None:
    torch.manual_seed(0)
    model = FusionClassifier(
        branches=["small_cnn", "darknet"],
        num_classes=2,
        fusion={"name": "average", "weights": "learned"},
        image_size=32,
        tta=tta,
        tta_scales=[1.25],
    ).eval()
    model.temperature.copy_(torch.tensor([1.3, 0.8]))
    images = torch.randint(0, 256, (21, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    before = predict(model, images, batch_size=8)
    model.fusion.weights.copy_(torch.tensor([0.8, 0.2]))  # what a fit, or fusion.prefer_equal, does to them
    again = predict(model, images, batch_size=8)
    assert not torch.equal(again.fused, before.fused)
    refused = decisions.refused(model, before, batch_size=8)
    assert torch.equal(refused.fused, again.fused)  # to the bit: the logged predictions are the served ones
    assert torch.equal(refused.probs, again.probs) and torch.equal(refused.logits, again.logits)


def test_a_fusion_of_features_cannot_be_refused_from_probabilities() -> None:
    model = tiny_model("concat")
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match="reads the branch features"):
        decisions.refused(model, predict(model, images), batch_size=4)
