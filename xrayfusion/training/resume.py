"""Resuming a killed run, and the tags a run keeps for it: its checkpoint folder and, on failure (or a stop on
purpose), the reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from xrayfusion.core.errors import ConfigError
from xrayfusion.training.checkpoints import last_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_DIR_TAG = "xrayfusion.checkpoint_dir"
FAILURE_TAG = "xrayfusion.failure_reason"
STOP_TAG = "xrayfusion.stop_reason"  # a run stopped on purpose (KILLED), e.g. a pruned search trial


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

    from xrayfusion.tracking import resolve_run_id

    run_id = resolve_run_id(tracking_uri, run_id, key="resume_run_id")  # a unique prefix is enough
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


def failure_reason(err: BaseException) -> str:
    """A one-line reason for the failure tag of a run."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:1000] if text else type(err).__name__


def checkpoint_hparams(path: str | Path) -> dict:
    """The hyperparameters a Lightning checkpoint was saved with ({} when it holds none)."""
    return dict(load_checkpoint(path).get("hyper_parameters") or {})
