"""End-to-end: two tiny trainings, then compare, evaluate, predict and `mlflow models predict` on their runs."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import SMALL_SYNTHETIC, mlflow_models_predict, write_image
from tests.training.test_cli import artifact_paths

FAST = ["model=ensemble", "model.branches=[small_cnn,darknet]", "gradcam.n_images=4"]
TRAIN = [a for a in SMALL_SYNTHETIC if not a.startswith(("tracking.", "gradcam."))]


@pytest.mark.slow
def test_train_compare_evaluate_predict_serve(cli_in_process, tracking_uri: str, tmp_path: Path) -> None:
    # every command runs in this process (its exit code and output are what a process would give, without its
    # start-up cost); only `mlflow models predict` at the end is a process of its own
    for fusion, extra in (("average", []), ("stacking", ["tracking.register_as=xray-demo"])):
        result = cli_in_process([*FAST, f"fusion={fusion}", *TRAIN, *extra])
        assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri)
    runs = {
        r.data.tags["fusion"]: r
        for r in client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    }
    stacking = runs["stacking"].info.run_id

    # training logged test intervals, predictions, Grad-CAM and the registered pyfunc model
    metrics = runs["stacking"].data.metrics
    assert metrics["test/fused/auroc_ci_low"] <= metrics["test/fused/auroc"] <= metrics["test/fused/auroc_ci_high"]
    assert "test/darknet/ap" in metrics and "test/fused/ece" in metrics
    assert {"test_predictions.csv", "plots/gradcam_test.png"} <= set(artifact_paths(client, stacking))
    versions = client.search_model_versions("name='xray-demo'")
    assert len(versions) == 1 and versions[0].run_id == stacking

    # compare: Markdown table of both runs, CSV, ROC and bar plots; read-only
    result = cli_in_process(["branches=true", "sort_by=auroc"], module="compare")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert (
        table.startswith("| run_name")
        and "average:small_cnn+darknet" in table
        and "stacking:small_cnn+darknet" in table
    )
    assert table.count("| stacking:") == 3 and " [" in table  # fused + 2 branches, with intervals
    csv = pd.read_csv(tmp_path / "comparison.csv")
    assert len(csv) == 6 and {"auroc", "auroc_ci_low", "auroc_ci_high"} <= set(csv.columns)
    fused = csv[csv["model"] == "fused"]["auroc"]
    assert list(fused) == sorted(fused, reverse=True)
    assert (tmp_path / "comparison_roc.png").stat().st_size > 0 and (tmp_path / "comparison_metrics.png").exists()
    assert "(2 runs)" in result.stderr
    assert client.get_run(stacking).data.metrics == metrics

    # evaluate: external-validation style on another synthetic set, logged under eval/<name>/
    args = [f"run_id={stacking[:8]}", "data=synthetic", "data.n_test=48", "data.seed=7", "metrics.bootstrap=100"]
    result = cli_in_process(args, module="evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| fused" in result.stdout and "| darknet" in result.stdout
    logged = client.get_run(stacking).data.metrics
    for model in ("small_cnn", "darknet", "fused"):
        for metric in ("acc", "precision", "recall", "specificity", "f1", "auroc", "ap", "ece"):
            assert f"eval/synthetic/{model}/{metric}" in logged
        assert logged[f"eval/synthetic/{model}/auroc_ci_low"] <= logged[f"eval/synthetic/{model}/auroc_ci_high"]
    assert "eval/synthetic/predictions.csv" in artifact_paths(client, stacking)
    # the branches' diversity on the evaluated split, printed, logged, and shown by compare under that prefix
    assert "branch diversity: mean disagreement" in result.stdout
    pair = "eval/synthetic/diversity/small_cnn__darknet"
    assert 0 <= logged[f"{pair}/disagreement"] <= 1
    assert logged["eval/synthetic/diversity/mean_disagreement"] == logged[f"{pair}/disagreement"]
    result = cli_in_process(["prefix=eval/synthetic"], module="compare")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = pd.read_csv(tmp_path / "comparison.csv").set_index("run_id").loc[stacking]
    assert shown["mean_disagreement"] == pytest.approx(logged["eval/synthetic/diversity/mean_disagreement"])
    result = cli_in_process([*args, "log=false", "name=printed"], module="evaluate")
    assert result.returncode == 0 and "eval/printed" in result.stdout
    assert not any(k.startswith("eval/printed") for k in client.get_run(stacking).data.metrics)

    # predict: a folder with a broken file
    for i in range(3):
        write_image(tmp_path / "new" / f"img{i}.png", i % 2, size=48, seed=i)
    (tmp_path / "new" / "broken.png").write_bytes(b"")
    # an 8-character prefix (what compare and the sweep table show) is enough
    result = cli_in_process(
        [f"run_id={stacking[:8]}", f"inputs={tmp_path / 'new'}", "output=preds.csv"], module="predict"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == 4 and preds["error"].notna().sum() == 1
    assert {"fused_prob_pneumonia", "small_cnn_prob_pneumonia", "darknet_prob_pneumonia"} <= set(preds.columns)
    result = cli_in_process([f"run_id={stacking}", "inputs=/nowhere/*.png"], module="predict")
    assert result.returncode == 2 and "matched no image" in result.stderr and "Traceback" not in result.stderr

    # the logged pyfunc model through MLflow's own CLI, no xrayfusion command
    paths = [str(p) for p in sorted((tmp_path / "new").glob("img*.png"))]
    out = mlflow_models_predict(tracking_uri, stacking, paths, tmp_path)
    assert len(out) == 3 and out["fused_prob_pneumonia"].between(0, 1).all()
    direct = preds.dropna(subset=["predicted_class"]).sort_values("path")
    assert list(out["predicted_class"]) == list(direct["predicted_class"])
