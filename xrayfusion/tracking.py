"""MLflow: tracking URI, experiment and run naming, params and artifacts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import MLFlowLogger

from xrayfusion.errors import ConfigError

ENV_URI = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI when set, else the configured URI (the local SQLite store by default)."""
    uri = os.environ.get(ENV_URI) or configured
    if not uri:
        raise ConfigError("no MLflow tracking URI: set logger.tracking_uri or MLFLOW_TRACKING_URI")
    return uri


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def prepare_store(uri: str) -> None:
    """Create the folder of a local SQLite store; fail at once when a tracking server does not answer."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as err:
            raise ConfigError(
                f"MLflow tracking server {uri} is unreachable ({err}); start it or fix {ENV_URI} / "
                "logger.tracking_uri before training"
            ) from err


def create_logger(
    cfg: Mapping[str, Any], run_name: str, tags: Mapping[str, str], run_id: str | None = None
) -> MLFlowLogger:
    """An MLFlowLogger on the resolved URI; artifacts of a local store go to `artifact_location`."""
    uri = resolve_tracking_uri(cfg.get("tracking_uri"))
    prepare_store(uri)
    artifact_location = None
    if is_local(uri) and cfg.get("artifact_location"):
        artifact_location = Path(cfg["artifact_location"]).resolve().as_uri()
    return MLFlowLogger(
        experiment_name=str(cfg.get("experiment_name", "xrayfusion")),
        run_name=run_name,
        tracking_uri=uri,
        tags=dict(tags),
        artifact_location=artifact_location,
        run_id=run_id,
    )


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to {'a/b': value}; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def log_params(logger: MLFlowLogger, params: Mapping[str, Any]) -> None:
    """Log a nested mapping as flattened params."""
    flat = {k: ("null" if v is None else str(v)) for k, v in flatten(params).items()}
    logger.log_hyperparams(flat)


def log_artifact(logger: MLFlowLogger, path: str | Path, artifact_path: str | None = None) -> None:
    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def set_status(logger: MLFlowLogger, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    logger.experiment.set_terminated(logger.run_id, status)
