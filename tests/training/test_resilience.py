"""Unit tests: atomic checkpoints, safe loading, resumed-run logging, the NaN guard, Hydra error messages."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import MissingConfigException

from tests.conftest import REPO
from xrayfusion import tracking
from xrayfusion.core.cli import error_message as hydra_error_message
from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.training.callbacks import FiniteLossGuard, NonFiniteLossError
from xrayfusion.training.checkpoints import atomic_torch_save, last_checkpoint, load_checkpoint
from xrayfusion.training.resume import find_resume

WRITER = """
import sys, torch
from xrayfusion.training.checkpoints import atomic_torch_save
path, i = sys.argv[1], 0
print("ready", flush=True)
while True:
    i += 1
    atomic_torch_save({"step": i, "w": torch.full((3_000_000,), float(i))}, path)
    print(f"saved {i}", flush=True)
"""


def test_kill_during_atomic_save_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 0, "w": torch.zeros(3_000_000)}, path)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    for step in (1, 2, 3):  # three complete 12 MB writes; the kill lands in the fourth (or just after it)
        assert proc.stdout.readline().strip() == f"saved {step}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(path)
    assert state["step"] >= 3 and bool((state["w"] == float(state["step"])).all())
    assert path.stat().st_mode & 0o044  # readable like any other file, not mkstemp's 0600


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def broken_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert last_checkpoint(tmp_path) == path and last_checkpoint(tmp_path / "none") is None


def test_load_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": FiniteLossGuard}, path)  # a class needs pickle to load
    with pytest.raises(DataError, match="weights_only=True"):
        load_checkpoint(path)
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_resumed_logger_skips_logged_steps_and_rejects_changed_params(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.set_tracking_uri writes it; keep tests apart
    cfg = {"tracking_uri": uri, "experiment_name": "x"}
    first = tracking.create_logger(cfg, "run", {})
    first.log_hyperparams({"optimizer/lr": "0.001", "paths/output_dir": "/a", "resume_run_id": "null"})
    first.log_metrics({"val/loss": 1.0}, step=3)
    first.log_metrics({"val/loss": 0.9, "lr": 0.1}, step=7)

    again = tracking.create_logger(cfg, "run", {}, run_id=first.run_id)
    assert isinstance(again, tracking.ResumedMLFlowLogger)
    again.log_hyperparams({"optimizer/lr": "0.001", "paths/output_dir": "/b", "resume_run_id": "abc", "new": 1})
    again.log_metrics({"val/loss": 0.5, "lr": 0.2}, step=7)  # step 7 already logged: dropped
    again.log_metrics({"val/loss": 0.4, "lr": 0.3}, step=8)
    client = mlflow.MlflowClient(uri)
    steps = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "val/loss")]
    assert sorted(steps) == [(3, 1.0), (7, 0.9), (8, pytest.approx(0.4))]
    assert client.get_run(first.run_id).data.params["new"] == "1"
    with pytest.raises(ConfigError, match="optimizer/lr=0.1"):
        again.log_hyperparams({"optimizer/lr": "0.1"})
    assert len(client.search_runs([first.experiment_id])) == 1


def test_find_resume_errors_name_the_run(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError, match="resume_run_id=0123"):
        find_resume(uri, "0123")
    logger = tracking.create_logger({"tracking_uri": uri}, "run", {})
    with pytest.raises(ConfigError, match="xrayfusion.checkpoint_dir"):
        find_resume(uri, logger.run_id)


class _Diverging(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).mean()
        return loss * float("inf") if batch_idx == 2 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_finite_loss_guard_stops_before_the_bad_step(tmp_path: Path) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=2)
    model = _Diverging()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[FiniteLossGuard()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 0, batch 2\).*no checkpoint"):
        trainer.fit(model, data)
    assert torch.isfinite(model.layer.weight).all()  # the bad step never reached the optimizer


def test_hydra_errors_become_one_line() -> None:
    err = MissingConfigException("In 'train': Could not find 'fusion/median'", "fusion/median", ["voting", "average"])
    assert hydra_error_message(err) == "fusion=median is not an option; choose fusion= one of average, voting"
    generic = hydra_error_message(ValueError("Could not override 'foo'.\nTo append use +foo=1\n\nConfig search path:"))
    assert generic == "Could not override 'foo'. To append use +foo=1"


def test_a_sparse_guard_still_keeps_non_finite_weights_out_of_every_checkpoint(tmp_path: Path) -> None:
    """every_n_steps=100 reads nothing back during the epoch; the check before the epoch's checkpoint stops it."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=2)
    guard = FiniteLossGuard(every_n_steps=100)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[guard, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(
        NonFiniteLossError, match=r"became -?inf at step 2 \(noticed at step 4.*no checkpoint was written"
    ):
        trainer.fit(_Diverging(), data)
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # the poisoned weights were never written


def test_the_guard_reads_the_loss_back_only_every_n_steps(monkeypatch) -> None:
    """No host read-back of the loss between checks: Tensor.item/__float__ are not called on the hot path."""
    guard = FiniteLossGuard(every_n_steps=5)
    checks: list[int] = []
    monkeypatch.setattr(guard, "check", lambda trainer: checks.append(trainer.global_step))
    trainer = type("T", (), {"global_step": 0})()
    for step in range(12):
        trainer.global_step = step
        guard.on_before_backward(trainer, None, torch.tensor(1.0))
    assert checks == [4, 9]
