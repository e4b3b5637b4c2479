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


# each process: its own runs in one SQLite store, logging the same datasets at the same instants
_RACE = """
import sys, time
import torch
from pytorch_lightning.loggers import MLFlowLogger
from xrayfusion.tracking import log_dataset_inputs

class Split:  # what log_dataset_inputs reads of an ImageSet
    def __init__(self, i):
        self.names, self.groups = [f"f{j}.png" for j in range(16)], [f"p{j}" for j in range(16)]
        self.labels, self._digest = torch.arange(16) % 2, f"digest{i}"
    def digest(self):
        return self._digest

uri, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
for i in range(rounds):
    logger = MLFlowLogger(experiment_name="race", tracking_uri=uri)
    logger.experiment.get_run(logger.run_id)  # the run exists before the race
    while time.time() < start + 0.5 * i:
        time.sleep(0.001)
    log_dataset_inputs(logger, uri, "kermany", sys.argv[4], {"train": Split(i)})
"""


@pytest.mark.slow
def test_two_processes_logging_the_same_datasets_at_once_into_one_sqlite_store(tmp_path: Path) -> None:
    # MLflow looks a dataset up, then inserts it: unguarded, about half of such simultaneous pairs fail with an
    # IntegrityError on its datasets table (seen in CI: two trainings of the same data started at once)
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("race")
    start, rounds = time.time() + 15, 6
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _RACE, uri, str(start), str(rounds), str(tmp_path)]
    procs = [subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errors]
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("race").experiment_id])
    assert len(runs) == 2 * rounds and all(len(r.inputs.dataset_inputs) == 1 for r in runs)
