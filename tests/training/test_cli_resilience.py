"""End-to-end: the real CLI killed, resumed, fed bad input, diverging, run twice, run at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import REPO, SMALL_SYNTHETIC, free_port
from xrayfusion.models import FusionClassifier
from xrayfusion.training.resume import CHECKPOINT_DIR_TAG, FAILURE_TAG

TINY = [*SMALL_SYNTHETIC, "model=ensemble", "model.branches=[small_cnn,small_cnn]", "fusion=average"]


def runs_of(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("xrayfusion")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def steps(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_run(cli_in_process, tmp_path: Path, tracking_uri: str) -> None:
    # bf16_branches=auto: the resumed part reuses the precisions the killed part measured (tests/test_precision.py)
    args = [*TINY, "trainer.max_epochs=3", "data.n_train=96", "model.bf16_branches=auto"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    # SIGKILL itself at step 8: in the second epoch, after the first epoch's last.ckpt (6 steps an epoch)
    kill = "+callbacks.extra.kill={_target_:tests.helpers.KillAtStep,step:8}"
    cmd = [sys.executable, "-m", "xrayfusion.train", *args, kill, f"hydra.run.dir={tmp_path}/outputs/killed"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = tmp_path / "outputs/killed/checkpoints/last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)  # a full Lightning checkpoint, no pickle
    assert state["global_step"] == 6 and "optimizer_states" in state and "callbacks" in state  # the first epoch's
    [killed] = runs_of(tracking_uri)
    assert killed.info.status == "RUNNING"  # nobody could mark it: SIGKILL
    assert killed.data.tags[CHECKPOINT_DIR_TAG] == str(last.parent)

    result = cli_in_process([*args, f"resume_run_id={killed.info.run_id}"])  # resuming needs no process of its own
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming run {killed.info.run_id}" in result.stdout + result.stderr
    [run] = runs_of(tracking_uri)  # the same run, no second one
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    client = mlflow.MlflowClient(tracking_uri)
    for key in ("val/fused/auroc", "train/loss", "val/loss", "lr-AdamW"):  # (Lightning logs "epoch" twice a step)
        history = steps(client, run.info.run_id, key)
        assert len(history) == len(set(history)) == 3, (key, history)  # one value per epoch, none twice
    assert all(f"test/{n}/auroc" in run.data.metrics for n in ("small_cnn", "small_cnn_2", "fused"))
    assert not last.exists()  # the finished run needs no resume state any more (tests/training/test_disk.py)


@pytest.mark.slow
def test_nan_loss_stops_keeps_checkpoint_and_fails_the_run(cli_in_process, tmp_path: Path, tracking_uri: str) -> None:
    diverge = "+scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:4,gamma:1e30}"
    result = cli_in_process([*TINY, "trainer.max_epochs=3", "scheduler=none", diverge])  # 4 steps/epoch, then lr 1e27
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("xrayfusion: error: training loss became") and "at step " in message
    [run] = runs_of(tracking_uri)
    assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags[FAILURE_TAG]
    last = Path(run.data.tags[CHECKPOINT_DIR_TAG]) / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_deterministic_training_repeats_exactly(train_task, tracking_uri: str, tmp_path: Path) -> None:
    for i in range(2):
        train_task([*TINY, "trainer.deterministic=true", "seed=7", f"paths.output_dir={tmp_path}/run{i}"])
    first, second = (run.data.metrics for run in runs_of(tracking_uri))
    tests = {k for k in first if k.startswith(("test/", "val/"))}
    assert tests and {k: first[k] for k in tests} == {k: second[k] for k in tests}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["model.branches=[resnet18,resnet_18]"], ["unknown backbone 'resnet_18'", "did you mean"]),
        (["fusion=median"], ["fusion=median", "stacking"]),
        (["trainer=tpu"], ["trainer=tpu", "cpu"]),
        (["fusion=stacking", "model=single", "model.branches=[small_cnn]"], ["fusion=stacking", "at least 2 branches"]),
        (["fusion=voting", "model=single", "model.branches=[small_cnn]"], ["fusion=voting", "at least 2 branches"]),
        (["model=single", "model.branches=[densenet121]", "data.image_size=28"], ["densenet121", "image_size=32"]),
        (["optimizer.lr=0"], ["optimizer.lr=0"]),
        (["data.batch_size=-4"], ["data.batch_size=-4"]),
        (["data=kermany", "data.root=null"], ["data.root is not set"]),
        (["data=kermany", "data.root=/no/such/folder"], ["data.root=/no/such/folder", "does not exist"]),
        (["data=kermany", "data.root={tmp}"], ["has no train/ folder"]),
        (["resume_run_id=0123abc"], ["resume_run_id=0123abc"]),
        (["not_a_key=1"], ["not_a_key"]),
    ],
)
def test_bad_input_is_one_short_message(
    cli_in_process, tmp_path: Path, overrides: list[str], needles: list[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not an image folder")
    model = [] if any(o.startswith("model") for o in overrides) else ["model.branches=[small_cnn,small_cnn]"]
    own_data = any(o.startswith("data=") for o in overrides)  # then the synthetic set's keys do not exist
    base = [o for o in SMALL_SYNTHETIC if not (own_data and o.startswith("data"))]
    result = cli_in_process([*base, *model, *(o.format(tmp=tmp_path) for o in overrides)])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1].startswith("xrayfusion: error: ")
    assert all(n.format(tmp=tmp_path) in lines[-1] for n in needles), lines[-1]
    assert not (tmp_path / "mlruns" / "artifacts").exists()  # failed before any run was logged


@pytest.mark.slow
def test_unreachable_tracking_server_fails_at_once(cli_in_process, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = cli_in_process(TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr.strip().splitlines()[-1]
    assert "images, class counts" not in result.stdout + result.stderr  # no data was read before the check


@pytest.mark.slow
def test_two_trainings_at_once_into_one_sqlite_store(tmp_path: Path, tracking_uri: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "xrayfusion.train", *TINY, f"seed={i}", f"hydra.run.dir={tmp_path}/out{i}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    runs = runs_of(tracking_uri)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["seed"] for r in runs} == {"0", "1"}
    for run in runs:
        assert "test/fused/auroc" in run.data.metrics and "val/fused/auroc" in run.data.metrics


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on a SQLite store with proxied artifacts, on a free local port."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{tmp_path}/server.db"),
        *("--artifacts-destination", str(tmp_path / "server-artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    server = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not start: {server.stderr.read()[-2000:] if server.poll() else 'timeout'}")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers: nothing of theirs is needed after the test
        server.wait()


@pytest.mark.slow
def test_training_logs_through_a_tracking_server(
    cli_in_process, mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = cli_in_process([*TINY, "fusion=stacking"])
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs_of(mlflow_server)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    client = mlflow.MlflowClient(mlflow_server)
    assert len(steps(client, run.info.run_id, "val/fused/auroc")) == 1 and "test/fused/auroc" in run.data.metrics
    local = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path / "download"))
    state = torch.load(local, map_location="cpu", weights_only=True)
    model = FusionClassifier(**state["hyper_parameters"])
    model.load_state_dict(state["state_dict"])
    assert model.fusion.fitted  # the stacking meta-learner came back without pickle
    assert list((tmp_path / "server-artifacts").rglob("best.ckpt"))  # stored by the server, not by the client
