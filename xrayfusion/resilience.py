"""What happens when things go wrong: resuming a killed run, stopping on a non-finite loss, failure tags."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from xrayfusion.checkpoints import last_checkpoint
from xrayfusion.errors import ConfigError, XrayfusionError

log = logging.getLogger(__name__)

CHECKPOINT_DIR_TAG = "xrayfusion.checkpoint_dir"
FAILURE_TAG = "xrayfusion.failure_reason"


@dataclass(frozen=True)
class Resume:
    """Where a killed run continues: its MLflow run id, its checkpoint folder and last checkpoint (None: start over)."""

    run_id: str
    checkpoint_dir: Path
    checkpoint: Path | None


def find_resume(tracking_uri: str, run_id: str) -> Resume:
    """Look up run `run_id` and the last checkpoint its training wrote (the folder is a tag of the run)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"resume_run_id={run_id} is not a run in {tracking_uri}; copy the run id from the MLflow UI "
            "(or MLFLOW_TRACKING_URI points at another store)"
        ) from err
    folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if not folder:
        raise ConfigError(f"run {run_id} has no {CHECKPOINT_DIR_TAG} tag: it was not started by xrayfusion.train")
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} already FINISHED; nothing to resume")
    ckpt = last_checkpoint(folder)
    if ckpt is None:
        log.warning("run %s left no checkpoint in %s: training starts over in the same run", run_id, folder)
    else:
        log.info("resuming run %s from %s", run_id, ckpt)
    return Resume(run_id, Path(folder), ckpt)


class NonFiniteLossError(XrayfusionError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(pl.Callback):
    """Stops training before the backward pass of a NaN/inf loss (on any process), naming the step."""

    def __init__(self) -> None:
        self.batch_idx = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self.batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            return
        ckpt = getattr(trainer.checkpoint_callback, "dirpath", None)
        kept = f"the last good checkpoint is {Path(ckpt) / 'last.ckpt'}" if ckpt else "no checkpoint was written"
        raise NonFiniteLossError(
            f"training loss became {value} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {self.batch_idx}); training stopped and {kept}. Lower optimizer.lr, set "
            "trainer.gradient_clip_val=1.0 or check the data"
        )


def failure_reason(err: BaseException) -> str:
    """A one-line reason for the failure tag of a run."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:1000] if text else type(err).__name__


def checkpoint_hparams(path: str | Path) -> dict:
    """The hyperparameters a Lightning checkpoint was saved with ({} when it holds none)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return dict(state.get("hyper_parameters") or {})
