"""End-to-end: cross-fitted stacking, meta-learners, learned weights, calibration and thresholds via the CLI."""

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import SMALL_SYNTHETIC, assert_logged_test_metrics_recompute
from xrayfusion.evaluation.evaluate import evaluate_model
from xrayfusion.evaluation.loading import load_classifier


def parent_and_children(tracking_uri: str) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def read_csv(tracking_uri: str, run_id: str, name: str) -> list[dict[str, str]]:
    path = mlflow.MlflowClient(tracking_uri).download_artifacts(run_id, name)
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_cross_fitted_stacking_logs_folds_oof_calibration_and_thresholds(cli_in_process, tracking_uri: str) -> None:
    args = ["model=ensemble", "model.branches=[resnet18,small_cnn]", "fusion=stacking", "fusion.cv=2"]
    result = cli_in_process([*args, "fusion.calibrate=true", "metrics.threshold=youden", *SMALL_SYNTHETIC])
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "fold 1/2" in output and "fold 2/2" in output
    parent, folds = parent_and_children(tracking_uri)
    assert parent.info.status == "FINISHED" and len(folds) == 2
    assert sorted(r.data.params["fold/index"] for r in folds) == ["1", "2"]
    assert sum(int(r.data.params["fold/n_heldout"]) for r in folds) == 64
    assert all(r.info.status == "FINISHED" and "oof/resnet18/auroc" in r.data.metrics for r in folds)
    metrics, params = parent.data.metrics, parent.data.params
    assert "time/crossfit_seconds" in metrics
    assert_logged_test_metrics_recompute(tracking_uri, parent.info.run_id)  # with the logged youden thresholds
    # the meta-learner was fitted out of fold, but the branch temperatures it reads were fitted on validation
    assert params["threshold/rule"] == "youden" and params["threshold/fused_chosen_on"] == "val_crossfit5"
    assert len({params[f"threshold/{name}"] for name in ("resnet18", "small_cnn", "fused")}) > 1  # chosen per model
    for name in ("resnet18", "small_cnn"):
        assert float(params[f"calibration/temperature_{name}"]) > 0
        assert f"calibration/{name}/val_ece_after" in metrics
    assert params["fusion/fitted_on"] == "oof_cv2" and params["stacking/meta"] == "logreg"
    rows = read_csv(tracking_uri, parent.info.run_id, "oof_predictions.csv")
    # one out-of-fold row per training image, none from validation or test
    assert len(rows) == 64 and len({r["name"] for r in rows}) == 64
    assert all(r["name"].startswith("train-") and r["fold"] in ("1", "2") for r in rows)
    assert {"resnet18/pneumonia", "small_cnn/normal"} <= set(rows[0])
    ckpt = mlflow.MlflowClient(tracking_uri).download_artifacts(parent.info.run_id, "checkpoints/best.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # each logged threshold is the float32 the decision rule compares with, exactly (not a rounded copy)
    hp = state["hyper_parameters"]
    for name, value in {**hp["branch_thresholds"], "fused": hp["threshold"]}.items():
        assert params[f"threshold/{name}"] == str(np.float32(value)), name
    assert json.loads(state["state_dict"]["fusion._extra_state"]["meta"])["kind"] == "logreg"


def assert_evaluate_val_scores_as_logged(tmp_path: Path, parent: mlflow.entities.Run) -> tuple:
    """evaluate split=val gives the run's logged fusion/val_auroc (and its interval) for the fused model and the
    logged validation AUROCs for the branches; returns the loaded model and the run's data config."""
    out = tmp_path / "outputs/run"
    model = load_classifier(out / "checkpoints/best.ckpt")
    data_cfg = OmegaConf.to_container(OmegaConf.load(out / "config.yaml").data, resolve=True)
    results, _, _ = evaluate_model(model, data_cfg, "val", n_bootstrap=100)  # SMALL_SYNTHETIC's metrics.bootstrap
    rows = results[results["metric"] == "auroc"].set_index("model")
    auroc = rows["value"]
    assert auroc["fused"] == pytest.approx(parent.data.metrics["fusion/val_auroc"], abs=1e-6)
    for end in ("low", "high"):  # the same patients resampled, with the split's seed
        logged = parent.data.metrics[f"fusion/val_auroc_ci_{end}"]
        assert rows.loc["fused", f"ci_{end}"] == pytest.approx(logged, abs=1e-6), end
    for name in ("small_cnn", "small_cnn_2"):  # branches are not fitted on validation: as logged
        assert auroc[name] == pytest.approx(parent.data.metrics[f"val/{name}/auroc"], abs=1e-6)
    return model, data_cfg


@pytest.mark.slow
def test_temperatures_fitted_on_validation_are_cross_fitted_for_the_score(
    cli_in_process, tracking_uri, tmp_path
) -> None:
    # an equal-weight average is fitted on nothing: only the temperatures (of both test-time views) saw validation
    args = ["model.branches=[small_cnn,small_cnn]", "fusion=average", "fusion.calibrate=true", "model.tta=flips"]
    result = cli_in_process([*args, *SMALL_SYNTHETIC])
    assert result.returncode == 0, result.stderr[-3000:]
    parent, _ = parent_and_children(tracking_uri)
    params = parent.data.params
    assert "fusion/fitted_on" not in params and "calibration/temperature_small_cnn" in params
    assert params["fusion/val_auroc_on"] == "val_crossfit5" and params["threshold/fused_chosen_on"] == "val_crossfit5"
    assert_evaluate_val_scores_as_logged(tmp_path, parent)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fusion_args,fitted_param",
    [
        (["fusion=stacking", "fusion.meta=hgb"], "stacking/hgb_trees"),
        (["fusion=stacking", "fusion.meta=mlp"], "stacking/mlp_layers"),
        # with temperatures fitted on validation too, of two test-time views: evaluate refits both per fold alike
        (
            ["fusion=average", "fusion.weights=learned", "fusion.calibrate=true", "model.tta=flips"],
            "average/weight_small_cnn",
        ),
    ],
)
def test_holdout_fits_log_what_they_fitted(
    cli_in_process, tracking_uri: str, tmp_path: Path, fusion_args: list, fitted_param: str
) -> None:
    # data.seed differs from seed: the cross-fitted validation folds follow the data seed, in training and evaluate
    args = ["model.branches=[small_cnn,small_cnn]", *fusion_args, "metrics.threshold=sensitivity@0.9", "data.seed=7"]
    result = cli_in_process([*args, *SMALL_SYNTHETIC])
    assert result.returncode == 0, result.stderr[-3000:]
    parent, folds = parent_and_children(tracking_uri)
    assert folds == [] and parent.info.status == "FINISHED"
    params = parent.data.params
    assert fitted_param in params and params["fusion/fitted_on"] == "holdout"
    if "average/weight_small_cnn" in params:
        total = float(params["average/weight_small_cnn"]) + float(params["average/weight_small_cnn_2"])
        assert total == pytest.approx(1.0, abs=1e-4)
    rows = read_csv(tracking_uri, parent.info.run_id, "oof_predictions.csv")
    assert len(rows) == 32 and all(r["name"].startswith("val-") and r["fold"] == "holdout" for r in rows)
    assert "threshold/fused" in params and "test/fused/ece" in parent.data.metrics
    # the final fusion is scored on validation predictions its fit has not seen: cross-fitted ones
    assert params["fusion/val_auroc_on"] == "val_crossfit5" and 0 <= parent.data.metrics["fusion/val_auroc"] <= 1
    # and evaluate split=val scores the fused model the same way (in-sample it would flatter the fit)
    model, data_cfg = assert_evaluate_val_scores_as_logged(tmp_path, parent)
    # the threshold rule re-chosen by evaluate on the same cross-fitted predictions gives the logged test metrics
    results, _, _ = evaluate_model(model, data_cfg, "test", n_bootstrap=0, threshold="sensitivity@0.9")
    fused = results[results["model"] == "fused"].set_index("metric")["value"]
    for metric in ("acc", "recall", "specificity"):
        assert fused[metric] == pytest.approx(parent.data.metrics[f"test/fused/{metric}"], abs=1e-6), metric


@pytest.mark.slow
def test_prefer_equal_logs_its_choice_and_the_run_serves_it(cli_in_process, tracking_uri: str, tmp_path: Path) -> None:
    args = [
        "model.branches=[small_cnn,small_cnn]",
        "fusion=average",
        "fusion.weights=learned",
        "fusion.prefer_equal=true",
    ]
    result = cli_in_process([*args, "metrics.threshold=youden", *SMALL_SYNTHETIC])
    assert result.returncode == 0, result.stderr[-3000:]
    parent, _ = parent_and_children(tracking_uri)
    params, metrics = parent.data.params, parent.data.metrics
    equal = metrics["fusion/learned_minus_equal_ci_low"] <= 0  # validation does not show the learned ones better
    assert params["fusion/prefer_equal_choice"].startswith("equal weights" if equal else "learned weights")
    assert params["fusion/fitted_on"] == ("none" if equal else "holdout")
    # the score of the weights kept: the equal average fitted on nothing, learned weights cross-fitted
    kept = "fusion/equal_val_auroc" if equal else "fusion/learned_val_auroc"
    assert metrics["fusion/val_auroc"] == pytest.approx(metrics[kept], abs=1e-9)
    assert params["fusion/val_auroc_on"] == ("val" if equal else "val_crossfit5")
    if equal:
        assert params["average/weight_small_cnn"] == params["average/weight_small_cnn_2"] == "0.5"
    model, _ = assert_evaluate_val_scores_as_logged(tmp_path, parent)
    assert model.hparams.fusion_fitted_on == params["fusion/fitted_on"]
    assert_logged_test_metrics_recompute(tracking_uri, parent.info.run_id)


@pytest.mark.slow
def test_bad_fusion_options_fail_before_training(cli_in_process) -> None:
    result = cli_in_process(["fusion=average", "fusion.prefer_equal=yes", *SMALL_SYNTHETIC])
    assert result.returncode == 2 and "fusion.prefer_equal='yes' must be true or false" in result.stderr
    result = cli_in_process(["fusion=voting", "+fusion.cv=3", *SMALL_SYNTHETIC])
    assert result.returncode == 2 and "only applies to fitted fusions" in result.stderr
    result = cli_in_process(["fusion=stacking", "metrics.threshold=best", *SMALL_SYNTHETIC])
    assert result.returncode == 2 and "metrics.threshold='best'" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli_in_process(["fusion=stacking", "fusion.cv=auto", "fusion.auto_cv.folds=0", *SMALL_SYNTHETIC])
    assert result.returncode == 2 and "a stacking meta-learner must be fitted" in result.stderr
    result = cli_in_process(["model.tta=scales", "model.tta_scales=[1.0]", *SMALL_SYNTHETIC])
    assert result.returncode == 2 and "model.tta_scales=[1.0] must list distinct scales besides 1" in result.stderr
    assert "Traceback" not in result.stderr
