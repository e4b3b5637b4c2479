"""DDP on the CPU (2 processes, gloo): one MLflow run, metrics over the whole splits, rows in their own order."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import SMALL_SYNTHETIC, compose_config
from xrayfusion.data import XRayDataModule
from xrayfusion.evaluation.evaluate import evaluate_model
from xrayfusion.evaluation.loading import load_classifier

# odd split sizes: a padding DistributedSampler would evaluate a sample twice and change the metrics
OVERRIDES = [
    *SMALL_SYNTHETIC,
    "data.n_val=31",
    "data.n_test=33",
    "model=ensemble",
    "model.branches=[small_cnn,small_cnn]",
    "fusion=stacking",
    "trainer=ddp_cpu",
]


@pytest.mark.slow
def test_ddp_cpu_logs_one_run_with_metrics_of_the_whole_test_set(run_cli, tracking_uri: str, tmp_path: Path) -> None:
    result = run_cli(OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer/devices"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val/fused/auroc")) == 1  # logged by rank 0 only

    # every row of test_predictions.csv carries its own image's label (rows are not interleaved by rank)
    frame = pd.read_csv(client.download_artifacts(run.info.run_id, "test_predictions.csv", str(tmp_path / "csv")))
    cfg = compose_config("train", [o for o in OVERRIDES if not o.startswith("trainer")])
    test = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True)).prepare().test
    truth = dict(zip(test.names, test.labels.tolist(), strict=True))
    assert len(frame) == 33 and list(frame["name"]) == test.names
    assert all(truth[name] == label for name, label in zip(frame["name"], frame["label"], strict=True))

    # single-process evaluation of the logged checkpoint on the same test split gives the logged values
    ckpt = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path / "download"))
    results, _, _ = evaluate_model(load_classifier(ckpt), OmegaConf.to_container(cfg.data, resolve=True), n_bootstrap=0)
    for row in results.itertuples():
        if row.value == row.value:
            assert run.data.metrics[f"test/{row.model}/{row.metric}"] == row.value, (row.model, row.metric)
