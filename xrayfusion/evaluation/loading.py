"""Load a trained ensemble: from a checkpoint file or a run's `checkpoints/best.ckpt` artifact."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from xrayfusion.core import runtime
from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.core.names import FUSED
from xrayfusion.models import FusionClassifier

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoints/best.ckpt"


def download_checkpoint(run_id: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """Download the run's `checkpoints/best.ckpt` artifact; returns the local file."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(
            f"run_id={run_id} is not a run in {tracking_uri}; list runs with python -m xrayfusion.compare"
        ) from err
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="xrayfusion-ckpt-"))
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(dst), tracking_uri=tracking_uri
        )
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise DataError(
            f"run {run_id} has no {CHECKPOINT_ARTIFACT} artifact ({err}); was its training finished?"
        ) from err
    return Path(local)


def load_classifier(ckpt_path: str | Path, device: str | torch.device = "cpu") -> FusionClassifier:
    """A FusionClassifier (branches, fitted fusion, threshold) from a checkpoint, in eval mode."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={path} is not a file; pass a checkpoint such as outputs/.../checkpoints/best.ckpt"
        )
    model = FusionClassifier.load_from_checkpoint(path, map_location=device, weights_only=True)
    if model.bf16_keys and torch.device(device).type == "cpu":
        names = ", ".join(model.bf16_branch_names)
        runtime.warn_slow_cpu_bf16("cpu", f"checkpoint {path.name} runs branches {names} in bfloat16")
    return model.eval()


def resolve_classifier(
    run_id: str | None, ckpt_path: str | None, tracking_uri: str | None, device: str = "cpu"
) -> FusionClassifier:
    """Load from `ckpt_path`, else from the run's checkpoint artifact."""
    if bool(run_id) == bool(ckpt_path):
        raise ConfigError("pass exactly one of run_id=<MLflow run id> or ckpt_path=<checkpoint file>")
    if ckpt_path:
        return load_classifier(ckpt_path, device)
    if not tracking_uri:
        raise ConfigError("no MLflow tracking URI to find run_id in; set MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="xrayfusion-ckpt-") as tmp:
        return load_classifier(download_checkpoint(str(run_id), tracking_uri, tmp), device)


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str]) -> None:
    """Fail when a data set's classes cannot be the model's (case differences are accepted)."""
    if len(model_classes) != len(data_classes):
        raise DataError(
            f"the model was trained on classes {list(model_classes)} but the data has {list(data_classes)}; "
            "evaluate on data with the same classes"
        )
    if [c.lower() for c in model_classes] != [c.lower() for c in data_classes]:
        log.warning("class names differ (model %s, data %s); matching them by position", model_classes, data_classes)


def trained_thresholds(model: FusionClassifier, override: float | None = None) -> dict[str, float]:
    """Per model name, the threshold chosen on validation at training time (or `override` for all of them).

    Each branch keeps its own threshold (`branch_thresholds`); checkpoints without them use the fused one.
    """
    fused = float(model.hparams.threshold) if override is None else float(override)
    own = dict(model.hparams.get("branch_thresholds") or {}) if override is None else {}
    return {**{k: float(own.get(k, fused)) for k in model.keys}, FUSED: fused}
