"""DDP on the CPU (2 processes, gloo): one MLflow run, metrics over the whole splits."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import REPO, SMALL_SYNTHETIC
from xrayfusion.data import XRayDataModule
from xrayfusion.models import FusionClassifier

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

    # single-process evaluation of the logged checkpoint on the same test split
    ckpt = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path / "download"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = FusionClassifier(**state["hyper_parameters"])
    model.load_state_dict(state["state_dict"])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[o for o in OVERRIDES if not o.startswith("trainer")])
    dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    [single] = trainer.test(model, dataloaders=dm.loader("test"), verbose=False)
    assert len(model.test_outputs["labels"]) == 33
    for name in ("small_cnn", "small_cnn_2", "fused"):
        for metric in ("acc", "recall", "specificity", "auroc"):
            key = f"test/{name}/{metric}"
            assert run.data.metrics[key] == pytest.approx(single[key], abs=1e-6), key
