"""Sweeps: one id per `-m` invocation, threads per parallel job, and the sweep's summary table from MLflow."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xrayfusion.core.names import CROSSFIT_SECONDS, FIT_SECONDS, FUSED_VAL_AUROC, SELECTION_CI, SELECTION_METRIC

if TYPE_CHECKING:  # mlflow and pandas load lazily: Hydra builds this callback on every command
    import pandas as pd

log = logging.getLogger(__name__)

ENV_SWEEP_ID = "XRAYFUSION_SWEEP_ID"
ENV_SWEEP_JOB = "XRAYFUSION_SWEEP_JOB"
SWEEP_TAG = "sweep_id"
BEST_PREFIX = "best/"
SUMMARY_METRICS = ("test/fused/acc", "test/fused/f1", "test/fused/auroc", FIT_SECONDS, CROSSFIT_SECONDS)
# params that differ between jobs without being a choice of the sweep
_NOISE_PARAMS = ("paths/", "logger/", "hydra/")


def new_sweep_id(sweep_dir: str | Path | None = None) -> str:
    """`<sweep folder name>-<6 hex>`, e.g. `06-12-31-a1b2c3`: readable and unique across sweeps."""
    stem = Path(sweep_dir).name if sweep_dir else time.strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def threads_per_job(n_jobs: int | None, cores: int | None = None) -> int:
    """Torch threads for each of `n_jobs` parallel jobs so they share `cores` without oversubscribing them.

    `n_jobs` follows joblib: -1 means one job per core, -2 all cores but one, and so on.
    """
    cores = cores or len(os.sched_getaffinity(0))
    if not n_jobs:
        return cores
    jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // jobs)


def sweep_runs(tracking_uri: str, experiment_name: str, sweep_id: str) -> pd.DataFrame:
    """The runs tagged `sweep_id=<sweep_id>`, one row each: run_id, run, status, `params.*`, `metrics.*`, `tags.*`."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return pd.DataFrame()
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.{SWEEP_TAG} = '{sweep_id}'")
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
        }
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def prepare_experiment(tracking_uri: str, experiment_name: str, artifact_location: str | None = None) -> str:
    """Create the store and the experiment once, before parallel jobs would race to migrate or create them."""
    import mlflow

    from xrayfusion import tracking

    tracking.prepare_store(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if artifact_location and tracking.is_local(tracking_uri):
        location = Path(artifact_location).resolve().as_uri()
    return client.create_experiment(experiment_name, artifact_location=location)


def varying_params(runs: pd.DataFrame) -> list[str]:
    """The `params.*` columns set in every run whose value differs between runs (what the sweep changed)."""
    cols = [c for c in runs.columns if c.startswith("params.") and not c[len("params.") :].startswith(_NOISE_PARAMS)]
    return sorted(c for c in cols if runs[c].notna().all() and runs[c].astype(str).nunique() > 1)


def summary_table(
    runs: pd.DataFrame,
    optimized_metric: str,
    mode: str = "max",
    metrics: Sequence[str] = SUMMARY_METRICS,
) -> pd.DataFrame:
    """One row per run: name, status, the params the sweep varied, its selection score (and the score's 95%
    interval when runs logged one), the best-epoch value of `optimized_metric`, `metrics`.

    Sorted best first by `selection/score` (`selection_score`; runs without it last); when no run has it (all
    logged before it existed), by the best-epoch value of `optimized_metric`.
    """
    if runs.empty:
        return runs.reindex(columns=["run", "run_id", "status"])
    best = f"metrics.{BEST_PREFIX}{optimized_metric}"
    score = f"metrics.{SELECTION_METRIC}"
    interval = [f"metrics.{name}" for name in SELECTION_CI]
    metric_cols = [c for c in (score, *interval, best, *(f"metrics.{m}" for m in metrics)) if c in runs.columns]
    job = ["tags.sweep_job"] if "tags.sweep_job" in runs.columns else []
    cols = ["run", "run_id", *job, "status", *varying_params(runs), *metric_cols]
    table = runs.assign(run_id=runs["run_id"].str[:8]).sort_values("start_time")[cols]  # a prefix evaluate takes
    key = score if score in table.columns else best
    if key in table.columns:
        table = table.sort_values(key, ascending=mode == "min", na_position="last", kind="stable")
    table = table.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.")) else c)
    table = table.rename(columns={"tags.sweep_job": "job"})
    return table.reset_index(drop=True)


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table; numbers (numeric param strings too) to `digits` significant digits;
    run ids stay text (a hex id such as 8e123456 is not a number)."""

    def cell(value: Any, column: str = "") -> str:
        if isinstance(value, str) and column != "run_id":
            try:
                value = float(value) if any(ch in value for ch in ".e") else value
            except ValueError:
                pass
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value).replace("|", "\\|")

    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += [
        "| " + " | ".join(cell(v, c) for v, c in zip(row, header, strict=True)) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join(lines)


def write_summary(table: pd.DataFrame, out_dir: str | Path, stem: str = "sweep_summary") -> list[Path]:
    """Save the table as `<stem>.md` and `<stem>.csv` in `out_dir`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(markdown_table(table) + "\n")
    table.to_csv(csv, index=False)
    return [md, csv]


def _launcher_n_jobs(launcher: Mapping[str, Any] | None) -> int | None:
    if not launcher or "n_jobs" not in launcher or "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    return int(launcher["n_jobs"])


class SweepCallback(Callback):
    """Hydra callback (conf/train.yaml, `hydra.callbacks.sweep`).

    Multirun: gives the jobs of one `-m` invocation one sweep id (the MLflow tag `sweep_id`, passed to jobs in
    the environment variable XRAYFUSION_SWEEP_ID, which `logger.sweep_id` reads); in each job of a parallel
    launcher sets torch threads to cores // n_jobs; at the end prints the sweep's table and saves it in the
    sweep folder (`sweep_summary.md`, `.csv`).
    """

    def __init__(self, threads_per_job: int | None = None) -> None:
        self.threads = threads_per_job
        self.sweep_id: str | None = None
        self._own_env = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_id = os.environ.get(ENV_SWEEP_ID) or new_sweep_id(config.hydra.sweep.dir)
        self._own_env = ENV_SWEEP_ID not in os.environ
        os.environ[ENV_SWEEP_ID] = self.sweep_id
        uri, experiment = self._experiment(config)
        prepare_experiment(uri, experiment, config.logger.get("artifact_location"))
        log.info("sweep id %s (MLflow tag %s, experiment %r)", self.sweep_id, SWEEP_TAG, experiment)

    @staticmethod
    def _experiment(config: DictConfig) -> tuple[str, str]:
        """Tracking URI and experiment name of the sweep's config."""
        from hydra.core.hydra_config import HydraConfig

        from xrayfusion.tracking import resolve_tracking_uri

        HydraConfig.instance().set_config(config)  # the logger's paths interpolate ${hydra:runtime.cwd}
        return resolve_tracking_uri(config.logger.get("tracking_uri")), str(config.logger.experiment_name)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_id:  # jobs on other processes or hosts get the id from the pickled callback
            os.environ[ENV_SWEEP_ID] = self.sweep_id
            os.environ[ENV_SWEEP_JOB] = str(config.hydra.job.get("num", ""))
        threads = self.threads or (
            threads_per_job(n) if (n := _launcher_n_jobs(config.hydra.get("launcher"))) is not None else None
        )
        if threads:
            import torch

            torch.set_num_threads(threads)
            log.info("torch threads per job: %d", threads)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(ENV_SWEEP_JOB, None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_id is None:
            return
        try:
            uri, experiment = self._experiment(config)
            runs = sweep_runs(uri, experiment, self.sweep_id)
            table = summary_table(runs, str(config.optimized_metric), str(config.optimized_mode))
            paths = write_summary(table, config.hydra.sweep.dir)
            print(f"\nSweep {self.sweep_id}: {len(table)} runs in MLflow experiment {experiment!r}")
            print(markdown_table(table))
            print(f"saved {', '.join(str(p) for p in paths)}")
        finally:
            if self._own_env:
                os.environ.pop(ENV_SWEEP_ID, None)


def sweep_tags(sweep_id: str | None, job_num: str | int | None = None) -> dict[str, str]:
    """MLflow tags of a job that belongs to a sweep (none for a single run)."""
    if not sweep_id:
        return {}
    tags = {SWEEP_TAG: str(sweep_id)}
    if job_num not in (None, ""):
        tags["sweep_job"] = str(job_num)
    return tags


def selection_score(
    optimized_metric: str, best: float | None, fused_val_auroc: float | None
) -> tuple[float | None, str]:
    """The run's score and the metric it is taken from: `fusion/val_auroc` (the final fused model, after its fusion
    was fitted, on validation predictions the fit has not seen) when `optimized_metric` is the fused validation
    AUROC, else the best epoch's value of `optimized_metric` (there is no post-fit counterpart to it)."""
    if optimized_metric == "val/fused/auroc" and fused_val_auroc is not None and math.isfinite(fused_val_auroc):
        return float(fused_val_auroc), FUSED_VAL_AUROC
    return best, f"{BEST_PREFIX}{optimized_metric}"


def best_metric(name: str, value: float | None) -> dict[str, float]:
    """`{'best/<name>': value}`: the best-epoch value a sweep optimizes, logged next to the per-epoch series."""
    return {} if value is None else {f"{BEST_PREFIX}{name}": float(value)}
