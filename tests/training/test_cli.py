"""End-to-end: the train task on composed configs (in-process) and the CLI, read back through the MLflow client."""

import re

import mlflow
import pytest

from tests.conftest import SMALL_SYNTHETIC, assert_logged_test_metrics_recompute


def artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["concat", "average", "voting", "stacking"])
def test_train_each_fusion_logs_a_complete_run(train_task, tracking_uri: str, fusion: str) -> None:
    best = train_task(["model=ensemble", "model.branches=[resnet18,small_cnn]", f"fusion={fusion}", *SMALL_SYNTHETIC])
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["fusion"] == fusion
    metrics = run.data.metrics
    for name in ("resnet18", "small_cnn", "fused"):
        for metric in ("acc", "precision", "recall", "specificity", "f1", "auroc"):
            assert f"test/{name}/{metric}" in metrics and f"val/{name}/{metric}" in metrics
    assert_logged_test_metrics_recompute(tracking_uri, run.info.run_id)
    # the task returns what sweeps optimise: the final fused model's validation AUROC (after the fusion's fit)
    assert best == pytest.approx(metrics["selection/score"]) and best == pytest.approx(metrics["fusion/val_auroc"])
    assert run.data.params["selection/source"] == "fusion/val_auroc" and "best/val/fused/auroc" in metrics
    # with its 95% bootstrap interval over the validation images
    interval = (metrics["selection/score_ci_low"], metrics["selection/score_ci_high"])
    assert interval == (metrics["fusion/val_auroc_ci_low"], metrics["fusion/val_auroc_ci_high"])
    assert 0 <= interval[0] <= interval[1] <= 1 and interval[0] <= best + 1e-9
    assert "train/loss" in metrics and "val/loss" in metrics
    assert run.data.params["fusion/name"] == fusion and run.data.params["model/branches"] == "['resnet18', 'small_cnn']"
    artifacts = artifact_paths(client, run.info.run_id)
    assert "checkpoints/best.ckpt" in artifacts and "config.yaml" in artifacts
    for plot in ("confusion_matrix_test.png", "roc_test.png", "training_curves.png"):
        assert f"plots/{plot}" in artifacts
    if fusion == "stacking":
        assert any(k.startswith("stacking/coef_") for k in run.data.params)


@pytest.mark.slow
def test_backbone_too_small_for_image_size_is_a_clean_error(cli_in_process) -> None:
    result = cli_in_process(["model=single", "model.branches=[densenet121]", "data=synthetic", "data.image_size=28"])
    assert result.returncode != 0
    assert "densenet121" in result.stderr and "data.image_size=32" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_kermany_layout_trains_end_to_end(train_task, tracking_uri: str, kermany_root) -> None:
    train_task(
        [
            "data=kermany",
            f"data.root={kermany_root}",
            "data.image_size=32",
            "data.val_fraction=0.25",
            "model.branches=[small_cnn,darknet]",
            "fusion=average",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
        ]
    )
    client = mlflow.MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])[0]
    assert run.data.params["data/n_test"] == "16"
    assert int(run.data.params["data/n_train"]) + int(run.data.params["data/n_val"]) == 48


@pytest.mark.slow
def test_speed_switches_together_train_and_log(cli_in_process, tracking_uri: str) -> None:
    switches = [
        "trainer.precision=bf16-mixed",
        "model.channels_last=true",
        "optimizer.fused=true",
        "model.bf16_branches=[small_cnn]",
    ]
    result = cli_in_process(["model=ensemble", "model.branches=[resnet18,small_cnn]", *switches, *SMALL_SYNTHETIC])
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    assert run.info.status == "FINISHED"
    assert_logged_test_metrics_recompute(tracking_uri, run.info.run_id)
    params = run.data.params
    assert params["trainer/precision"] == "bf16-mixed" and params["optimizer/fused"] == "True"
    assert params["model/channels_last"] == "True" and params["model/bf16_branches"] == "['small_cnn']"


@pytest.mark.slow
def test_named_bf16_branch_falls_back_to_float32_without_bf16_units(cli_in_process, tracking_uri, monkeypatch) -> None:
    from xrayfusion.models import precision

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "none")
    result = cli_in_process(
        [
            "model=ensemble",
            "model.branches=[resnet18,small_cnn]",
            "model.bf16_branches=[small_cnn]",
            "trainer.accelerator=cpu",
            *SMALL_SYNTHETIC,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "so these branches train in float32 (model.bf16_fallback=float32)" in result.stderr + result.stdout
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    params = run.data.params
    assert params["model/bf16_branches"] == "['small_cnn']" and params["precision/bf16_branches"] == "none"
    assert params["precision/bf16_fallback"] == "float32 (no bf16 units on this CPU): small_cnn"
    assert_logged_test_metrics_recompute(tracking_uri, run.info.run_id)


@pytest.mark.slow
def test_bf16_branches_auto_logs_its_choice(cli_in_process, tracking_uri: str) -> None:
    result = cli_in_process(
        ["model=ensemble", "model.branches=[resnet18,small_cnn]", "model.bf16_branches=auto", *SMALL_SYNTHETIC]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.bf16_branches=auto chose" in result.stderr + result.stdout
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    assert run.info.status == "FINISHED"
    chosen = run.data.params["precision/bf16_branches"]
    said = re.search(r"model\.bf16_branches=auto chose \[(.*?)\]", result.stderr + result.stdout).group(1)
    measured = [name.strip(" '") for name in said.split(",") if name.strip()]
    assert chosen == (",".join(measured) or "none")  # the logged param is what the timing chose
