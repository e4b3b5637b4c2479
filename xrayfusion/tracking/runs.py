"""MLflow runs: tracking URI, store, experiment, the Lightning logger (new or resumed), params, artifacts, tags."""

from __future__ import annotations

import fcntl
import logging
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from xrayfusion.core.errors import ConfigError

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI when set, else the configured URI (the local SQLite store by default)."""
    uri = os.environ.get(ENV_URI) or configured
    if not uri:
        raise ConfigError("no MLflow tracking URI: set logger.tracking_uri or MLFLOW_TRACKING_URI")
    return uri


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a local SQLite store (no-op for servers), so that concurrent trainings
    do not race to create its tables or the experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created when missing; safe when several trainings start at once."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with _store_lock(uri):
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another process (on a server) created it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


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
    name = str(cfg.get("experiment_name", "xrayfusion"))
    if run_id is None and rank_zero_only.rank == 0:
        ensure_experiment(uri, name, artifact_location)
    kind = MLFlowLogger if run_id is None else ResumedMLFlowLogger
    return kind(
        experiment_name=name,
        run_name=run_name,
        tracking_uri=uri,
        tags=dict(tags),
        artifact_location=artifact_location,
        run_id=run_id,
    )


class ResumedMLFlowLogger(MLFlowLogger):
    """Continues an existing run: metrics at steps it already holds and params it already has are not re-logged;
    a param whose value changed (other than paths/ and resume_run_id) is a ConfigError."""

    IGNORED_PARAMS = ("paths/", "resume_run_id")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_steps: dict[str, int] | None = None
        self._params: dict[str, str] | None = None

    def _load_history(self) -> None:
        if self._params is not None:
            return
        run = self.experiment.get_run(self.run_id)
        self._params = dict(run.data.params)
        self._last_steps = {
            key: max(m.step for m in self.experiment.get_metric_history(self.run_id, key)) for key in run.data.metrics
        }

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._load_history()
        new, changed = {}, []
        for key, value in dict(params).items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != str(value)[:250] and not key.startswith(self.IGNORED_PARAMS):
                changed.append(f"{key}={value} (the run has {old})")
        if changed:
            raise ConfigError(
                f"resume_run_id={self.run_id} was trained with another config: {'; '.join(changed)}; "
                "resume with the original overrides or start a new run"
            )
        if new:
            super().log_hyperparams(new)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._load_history()
        fresh = {k: v for k, v in metrics.items() if (step or 0) > self._last_steps.get(k, -1)}
        if fresh:
            super().log_metrics(fresh, step)


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


@rank_zero_only
def log_artifact(logger: MLFlowLogger, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file to the run (global rank 0 only)."""
    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


@rank_zero_only
def set_status(logger: MLFlowLogger, status: str) -> None:
    """Mark the run RUNNING, FINISHED, FAILED or KILLED (global rank 0 only)."""
    if status == "RUNNING":
        logger.experiment.update_run(logger.run_id, status=status)
    else:
        logger.experiment.set_terminated(logger.run_id, status)


@rank_zero_only
def set_tags(logger: MLFlowLogger, tags: Mapping[str, Any]) -> None:
    """Set run tags (global rank 0 only)."""
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, str(value)[:5000])


def require_store(uri: str) -> None:
    """For read-only commands: a ConfigError when a local SQLite store does not exist, instead of creating an
    empty one (MlflowClient would), naming where it looked and how to point at the right one."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.is_file():
        raise ConfigError(
            f"no MLflow store at {path} (the default store is mlruns/mlflow.db relative to the folder you run in, "
            f"here {Path.cwd()}); run from the folder you trained in, or point at the store with "
            "MLFLOW_TRACKING_URI=sqlite:////absolute/path/to/mlruns/mlflow.db"
        )


def resolve_run_id(uri: str, run_id: str, key: str = "run_id") -> str:
    """The full id of the run that `run_id` names: a full 32-character id, or a unique prefix of one (the first
    8 characters that `compare` and sweep tables show). ConfigError for no match or several, listing them."""
    from mlflow import MlflowClient

    wanted = str(run_id).strip().lower()
    if len(wanted) < 4 or any(c not in "0123456789abcdef" for c in wanted):
        raise ConfigError(f"{key}={run_id} is not a run id or a prefix of one (4 or more hex characters)")
    try:
        require_store(uri)
    except ConfigError as err:
        raise ConfigError(f"{key}={run_id}: {err}") from err
    client = MlflowClient(uri)
    if len(wanted) == 32:
        return wanted
    experiments = [e.experiment_id for e in client.search_experiments()]
    matches, token = [], None
    while experiments:
        page = client.search_runs(experiments, max_results=5000, page_token=token)
        matches += [r for r in page if r.info.run_id.startswith(wanted)]
        token = page.token
        if not token:
            break
    if len(matches) == 1:
        return matches[0].info.run_id
    if not matches:
        raise ConfigError(
            f"{key}={run_id} is not a run in {uri} (no run id starts with it); list runs with "
            "python -m xrayfusion.compare (or MLFLOW_TRACKING_URI points at another store)"
        )
    listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in matches[:10])
    raise ConfigError(f"{key}={run_id} matches {len(matches)} runs: {listed}; give more characters of the id")


def log_dataset_inputs(
    logger: MLFlowLogger, tracking_uri: str, name: str, source: str, splits: Mapping[str, Any]
) -> None:
    """Each split the run used as an MLflow dataset input (the UI's Dataset column): name `<data>/<split>`,
    the data's root as its source, the file list (name, patient, label) as its rows and its digest."""
    import mlflow
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    on_disk = Path(source).exists()
    origin = str(Path(source).resolve()) if on_disk else CodeDatasetSource({"xrayfusion.data": source})
    inputs = []
    for split, images in splits.items():
        if images is None:
            continue
        frame = pd.DataFrame({"name": images.names, "patient": images.groups, "label": images.labels.tolist()})
        # the digest of the file names identifies the split across runs (the checkpoint stores it too)
        with warnings.catch_warnings():  # a local folder "can be interpreted in multiple ways": it is a folder
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")  # labels are ints
            dataset = mlflow.data.from_pandas(
                frame, source=origin, targets="label", name=f"{name}/{split}", digest=images.digest()
            )
            entity = dataset._to_mlflow_entity()  # infers the schema (and warns about the int labels) here
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", split)]))
    if inputs and rank_zero_only.rank == 0:
        # MLflow looks a dataset up, then inserts it: two trainings of the same data starting at once into one SQLite
        # store race between the two (an IntegrityError on its datasets table, seen in CI); the store's file lock
        # makes look-up and insert one step across processes (a no-op for tracking servers)
        with _store_lock(tracking_uri):
            logger.experiment.log_inputs(logger.run_id, datasets=inputs)


@contextmanager
def system_metrics(logger: MLFlowLogger, uri: str, interval_s: float | None) -> Iterator[None]:
    """CPU, memory, disk and network use (GPU with pynvml) logged as MLflow system metrics (`system/...`) while
    the block runs; `interval_s=None` turns it off. Without psutil it logs a warning and carries on."""
    if interval_s is None or rank_zero_only.rank != 0:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(logger.run_id, sampling_interval=float(interval_s), tracking_uri=uri)
    except ImportError as err:
        log.warning("no system metrics (%s); pip install psutil to log them", err)
        yield
        return
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
