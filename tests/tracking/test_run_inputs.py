"""MLflow as its users expect: the datasets a run used as inputs, system metrics, registry aliases."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tests.conftest import SMALL_SYNTHETIC, compose_config
from xrayfusion.data import XRayDataModule


@pytest.mark.slow
def test_a_run_logs_its_datasets_system_metrics_and_registry_alias(train_task, tmp_path: Path) -> None:
    args = [a for a in SMALL_SYNTHETIC if not a.startswith("tracking.")]
    extra = ["tracking.system_metrics_interval_s=0.2", "tracking.register_as=xray-alias", "trainer.max_epochs=2"]
    train_task(["model.branches=[small_cnn,darknet]", *args, *extra])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    cfg = compose_config("train", SMALL_SYNTHETIC)
    source = XRayDataModule(dict(cfg.data)).prepare()
    logged = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(logged) == {"synthetic/train", "synthetic/val", "synthetic/test"}
    for split in ("train", "val", "test"):
        entry = logged[f"synthetic/{split}"]
        assert entry.dataset.digest == getattr(source, split).digest()  # the digest the checkpoint stores too
        assert [t.value for t in entry.tags if t.key == "mlflow.data.context"] == [split]
    assert any(key.startswith("system/cpu_utilization_percentage") for key in run.data.metrics)
    version = client.get_model_version_by_alias("xray-alias", "candidate")
    assert version.run_id == run.info.run_id
