"""A finished run leaves about 2x its weights plus the logged model on disk; a killed one keeps what resume needs."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tests.conftest import SMALL_SYNTHETIC
from xrayfusion.evaluation.loading import load_classifier


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


@pytest.mark.slow
def test_a_finished_two_branch_run_leaves_about_twice_its_weights(train_task, tmp_path: Path) -> None:
    args = [a for a in SMALL_SYNTHETIC if not a.startswith("tracking.")]  # with the logged pyfunc model
    train_task(["model=ensemble", "model.branches=[resnet18,small_cnn]", "trainer.max_epochs=2", *args])
    ckpts = sorted((tmp_path / "outputs/run/checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["best.ckpt"]  # no epoch checkpoints, no last.ckpt with optimizer state
    model = load_classifier(ckpts[0])
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    logged_model = _bytes((tmp_path / "mlruns").rglob("*")) - _bytes(artifacts.rglob("*"))
    everything = _bytes(tmp_path.rglob("*")) - _bytes((tmp_path / "mlflow.db",))
    run_files = everything - logged_model
    assert run_files <= 2.2 * weights, (run_files, weights)  # best.ckpt in outputs/ and as the run's artifact
    assert logged_model <= 1.3 * weights, (logged_model, weights)  # the pyfunc model holds one more copy
