"""Compare MLflow runs: one table row per run (and per branch), ROC curves and a metrics bar chart. Read-only."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run

from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.core.names import (
    CROSSFIT_SECONDS,
    DIVERSITY,
    DIVERSITY_METRICS,
    FIT_SECONDS,
    FUSED,
    FUSED_VAL_AUROC,
    SELECTION_CI,
    SELECTION_METRIC,
    SELECTION_MODE,
    SELECTION_SOURCE,
)
from xrayfusion.evaluation.metrics import probs_from_frame
from xrayfusion.evaluation.plots import plt, roc_points

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("acc", "precision", "recall", "specificity", "f1", "auroc")
INFO_COLUMNS = ("run_name", "run_id", "model", "fusion", "branches", "data")
# the mean over pairs of branches of each diversity metric, on the fused row of ensemble runs
DIVERSITY_COLUMNS = tuple(f"mean_{m}" for m in DIVERSITY_METRICS)
# the run's validation score (`selection/score`, what a recipe is chosen on), on its fused row; the default sort
SELECTION = "val_score"
# what the run's training cost: its fit plus its cross-fit folds' trainings (wall seconds), on its fused row
TRAIN_SECONDS = "train_seconds"


def build_filter(tags: Mapping[str, str] | None, filter_string: str | None) -> str:
    """An MLflow filter string: tag equalities ANDed with the user's filter."""
    parts = [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items() if v is not None]
    if filter_string:
        parts.append(f"({filter_string})" if " or " in filter_string.lower() else filter_string)
    return " and ".join(parts)


def search_runs(
    tracking_uri: str,
    experiments: str | Sequence[str],
    tags: Mapping[str, str] | None = None,
    filter_string: str | None = None,
    max_runs: int = 100,
) -> list[Run]:
    """Runs of the named experiments that match the tags and filter string."""
    client = mlflow.MlflowClient(tracking_uri)
    names = [experiments] if isinstance(experiments, str) else list(experiments)
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = [e.name for e in client.search_experiments()]
            raise ConfigError(f"experiment={name!r} is not in {tracking_uri}; known experiments: {known}")
        ids.append(exp.experiment_id)
    try:
        return list(client.search_runs(ids, build_filter(tags, filter_string), max_results=max_runs))
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(
            f"filter={filter_string!r} is not a valid MLflow filter string ({err.message}); "
            'e.g. filter="metrics.`test/fused/auroc` > 0.8"'
        ) from err


def run_models(run: Run, prefix: str) -> list[str]:
    """Model names (fused first, then branches) with metrics under `<prefix>/<model>/...`."""
    found: list[str] = []
    for key in run.data.metrics:
        if key.startswith(prefix + "/"):
            parts = key[len(prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[0] not in found and parts[0] != DIVERSITY:
                found.append(parts[0])
    branches = [k for k in run.data.tags.get("branches", "").split(",") if k in found]
    rest = sorted(m for m in found if m not in branches and m != FUSED)
    return ([FUSED] if FUSED in found else []) + branches + rest


def comparison_frame(
    runs: Sequence[Run],
    prefix: str = "test",
    metrics: Sequence[str] = DEFAULT_METRICS,
    branches: bool = False,
    sort_by: str = SELECTION,
    ascending: bool | None = None,
) -> pd.DataFrame:
    """One row per run (its fused model) and, with `branches`, per branch; runs sorted by `sort_by`: `val_score`
    (the run's validation selection score, `selection/score`: choose recipes on it) or one of `metrics` under
    `prefix` (of the fused model). `ascending=None`: best first (`val_score` in the direction the runs logged,
    `selection/mode`; metrics descending). Runs whose scores come from different metrics (`selection/source`)
    are warned about: their `val_score`s do not compare.

    Fused rows also get the run's `val_score` with its 95% interval (`val_score_ci_low`, `_high`: bootstrap
    over the validation patients) and where the score comes from (`val_score_source`), and the ensemble's mean
    branch diversity (`mean_disagreement`, `mean_error_corr`; NaN for one-branch runs and runs logged before
    they existed), and what its training cost (`train_seconds`: the fit plus any cross-fit folds; NaN when the
    run logged no fit time).
    """
    rows = []
    for order, run in enumerate(runs):
        models = run_models(run, prefix)
        models = models if branches else [m for m in models if m == FUSED]
        for model in models or [FUSED]:
            row = {
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
                "model": model,
                "fusion": run.data.tags.get("fusion", ""),
                "branches": run.data.tags.get("branches", ""),
                "data": run.data.tags.get("data", ""),
                SELECTION: run.data.metrics.get(SELECTION_METRIC, math.nan) if model == FUSED else math.nan,
                f"{SELECTION}_source": run.data.params.get(SELECTION_SOURCE, "") if model == FUSED else "",
                **{
                    f"{SELECTION}{suffix}": run.data.metrics.get(name, math.nan) if model == FUSED else math.nan
                    for suffix, name in zip(("_ci_low", "_ci_high"), SELECTION_CI, strict=True)
                },
                TRAIN_SECONDS: train_seconds(run) if model == FUSED else math.nan,
                "_run": order,
                "_fused": model != FUSED,
            }
            for metric in metrics:
                for suffix in ("", "_ci_low", "_ci_high"):
                    row[f"{metric}{suffix}"] = run.data.metrics.get(f"{prefix}/{model}/{metric}{suffix}", math.nan)
            for column in DIVERSITY_COLUMNS:  # a property of the ensemble: the fused row only
                value = run.data.metrics.get(f"{prefix}/{DIVERSITY}/{column}", math.nan)
                row[column] = value if model == FUSED else math.nan
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    if sort_by != SELECTION and sort_by not in metrics:
        raise ConfigError(f"sort_by={sort_by} is neither {SELECTION} nor one of the compared metrics {list(metrics)}")
    scored = [r for r in runs if SELECTION_METRIC in r.data.metrics]
    sources = sorted({r.data.params.get(SELECTION_SOURCE, "?") for r in scored})
    if len(sources) > 1:
        log.warning("the runs' val_score comes from different metrics (%s): those scores do not compare", sources)
    if ascending is None:
        modes = {r.data.params.get(SELECTION_MODE, "max") for r in scored}
        ascending = sort_by == SELECTION and modes == {"min"}
    key = frame[frame["model"] == FUSED].set_index("_run")[sort_by]
    frame["_key"] = frame["_run"].map(key)
    frame = frame.sort_values(["_key", "_run", "_fused"], ascending=[ascending, True, True], na_position="last")
    return frame.drop(columns=["_run", "_fused", "_key"]).reset_index(drop=True)


def train_seconds(run: Run) -> float:
    """Wall seconds the run spent training: its fit plus its cross-fit folds (NaN when it logged no fit time)."""
    metrics = run.data.metrics
    return metrics.get(FIT_SECONDS, math.nan) + metrics.get(CROSSFIT_SECONDS, 0.0)


def markdown_table(frame: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS, digits: int = 3) -> str:
    """Markdown with the runs' validation scores (when any run has one), then `value [low, high]` cells
    (intervals where the run has them; the validation score's too, to 4 places), then the mean branch
    diversity columns and `train_seconds` when any run has them."""

    def cell(row: pd.Series, metric: str, places: int = digits) -> str:
        value, lo, hi = row[metric], row.get(f"{metric}_ci_low", math.nan), row.get(f"{metric}_ci_high", math.nan)
        if not math.isfinite(value):
            return "n/a"
        text = f"{value:.{places}f}"
        return text + (f" [{lo:.{places}f}, {hi:.{places}f}]" if math.isfinite(lo) and math.isfinite(hi) else "")

    table = frame[["run_name", "model", "fusion", "branches", "data"]].copy()
    table.insert(1, "run_id", frame["run_id"].str[:8])
    if SELECTION in frame and frame[SELECTION].notna().any():
        table[SELECTION] = [cell(row, SELECTION, 4) for _, row in frame.iterrows()]
    for metric in metrics:
        table[metric] = [cell(row, metric) for _, row in frame.iterrows()]
    for column in DIVERSITY_COLUMNS:
        if column in frame and frame[column].notna().any():
            table[column] = [f"{v:.{digits}f}" if math.isfinite(v) else "n/a" for v in frame[column]]
    if TRAIN_SECONDS in frame and frame[TRAIN_SECONDS].notna().any():
        table[TRAIN_SECONDS] = [f"{v:.0f}" if math.isfinite(v) else "n/a" for v in frame[TRAIN_SECONDS]]
    return table.to_markdown(index=False)


def validation_ties(frame: pd.DataFrame) -> str | None:
    """A line naming the runs whose validation score lies within the 95% interval of the best-scored run's
    (validation cannot tell them from it), or None when none does. Runs take part when scored on
    `fusion/val_auroc` (higher is better; the metric the interval comes with) on the best run's data; the best
    run needs an interval (runs logged before intervals, or with `metrics.bootstrap=0`, have none). The interval is
    the best run's own (patients resampled), not one of paired differences between runs: a tie it reports is
    a lack of evidence on validation, not proof that the runs are equal. When one of the tied runs trained in
    less time than the best run (`train_seconds`), the line names the quickest: with validation unable to rank
    them, the cheaper recipe is the one to prefer (in the spirit of the one-standard-error rule; docs/sweeps.md).
    `frame` is `comparison_frame`'s."""
    low, high, source = f"{SELECTION}_ci_low", f"{SELECTION}_ci_high", f"{SELECTION}_source"
    if source not in frame:
        return None
    scored = frame[(frame["model"] == FUSED) & frame[SELECTION].notna() & (frame[source] == FUSED_VAL_AUROC)]
    if len(scored) < 2:
        return None
    leader = scored.loc[scored[SELECTION].idxmax()]
    lo, hi = leader[low], leader[high]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    same_data = scored[(scored["data"] == leader["data"]) & (scored["run_id"] != leader["run_id"])]
    within = same_data[same_data[SELECTION].between(lo, hi)]
    if within.empty:
        return None
    names = ", ".join(f"{r.run_name} ({r.run_id[:8]}, {r[SELECTION]:.4f})" for _, r in within.iterrows())
    line = (
        f"validation cannot tell {leader['run_name']} ({leader['run_id'][:8]}, val_score {leader[SELECTION]:.4f}) "
        f"from {names}: their scores lie within its 95% interval [{lo:.4f}, {hi:.4f}] (validation patients "
        "resampled; a larger data.val_fraction narrows it, validation images from another source, a val/ folder, "
        "make it harder)"
    )
    cost = within[TRAIN_SECONDS] if TRAIN_SECONDS in within else pd.Series(dtype=float)
    if cost.notna().any() and math.isfinite(leader.get(TRAIN_SECONDS, math.nan)):
        quickest = within.loc[cost.idxmin()]
        if quickest[TRAIN_SECONDS] < leader[TRAIN_SECONDS]:
            line += (
                f"; the quickest of them to train is {quickest['run_name']} ({quickest['run_id'][:8]}, "
                f"{quickest[TRAIN_SECONDS]:.0f} s against {leader[TRAIN_SECONDS]:.0f} s): prefer it while validation "
                "cannot rank them"
            )
    return line


def predictions_artifact(prefix: str) -> str:
    """Where a run keeps the per-image predictions behind `<prefix>` metrics."""
    return "test_predictions.csv" if prefix == "test" else f"{prefix}/predictions.csv"


def load_predictions(tracking_uri: str, run_id: str, prefix: str) -> pd.DataFrame | None:
    """The run's predictions CSV, or None when it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=predictions_artifact(prefix), dst_path=tmp, tracking_uri=tracking_uri
            )
        except (mlflow.exceptions.MlflowException, OSError):
            return None
        return pd.read_csv(path)


def roc_figure(curves: Mapping[str, pd.DataFrame]) -> Figure:
    """Fused ROC curve of each run on one plot (micro-averaged for more than two classes)."""
    from sklearn.metrics import auc

    fig, ax = plt.subplots(figsize=(6, 5))
    for label, frame in curves.items():
        labels = frame["label"].to_numpy(dtype=int)
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr = roc_points(labels, probs_from_frame(frame, FUSED))
        ax.plot(fpr, tpr, lw=1.6, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title="ROC of compared runs (fused)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def bar_figure(frame: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> Figure:
    """Grouped bars: one group per metric, one bar per table row, 95% intervals as error bars where present."""
    if frame.empty:
        raise DataError("no runs to plot")
    labels = [
        f"{r.run_name} ({r.run_id[:6]})" + ("" if r.model == FUSED else f" {r.model}") for r in frame.itertuples()
    ]
    x = np.arange(len(metrics))
    width = 0.8 / len(frame)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(metrics) + 0.3 * len(frame)), 4.5))
    for i, (label, (_, row)) in enumerate(zip(labels, frame.iterrows(), strict=True)):
        values = np.array([row[m] for m in metrics], dtype=float)
        lo = np.array([row[f"{m}_ci_low"] for m in metrics], dtype=float)
        hi = np.array([row[f"{m}_ci_high"] for m in metrics], dtype=float)
        err = np.vstack([np.nan_to_num(values - lo), np.nan_to_num(hi - values)]).clip(min=0)
        ax.bar(x + (i - (len(frame) - 1) / 2) * width, np.nan_to_num(values), width, yerr=err, capsize=2, label=label)
    ax.set_xticks(x, list(metrics))
    ax.set(ylim=(0, 1.05), ylabel="value", title="Metrics of compared runs (bars: 95% bootstrap interval)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    return fig
