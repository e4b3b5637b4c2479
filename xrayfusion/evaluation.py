"""Evaluate a trained ensemble: load it from a run or checkpoint, predict, score with bootstrap intervals."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional import classification as tmf

from xrayfusion import runtime
from xrayfusion.errors import ConfigError, DataError
from xrayfusion.models import FusionClassifier

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoints/best.ckpt"
EVAL_METRICS = ("acc", "precision", "recall", "specificity", "f1", "auroc", "ap", "ece")
RANKING_METRICS = ("auroc", "ap")  # undefined when a resample holds one class only
FUSED = "fused"


# ---- loading -------------------------------------------------------------------------------------------
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


# ---- predictions ---------------------------------------------------------------------------------------
@torch.no_grad()
def predict_images(model: FusionClassifier, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Class probabilities of every branch (by key) and of the fused model for uint8 images (N, 1, H, W)."""
    model.eval()
    branch, fused = [], []
    for start in range(0, len(images), batch_size):
        out = model(images[start : start + batch_size].to(model.device))
        branch.append(out["probs"].float().cpu())
        fused.append(out["fused_probs"].float().cpu())
    k, c = len(model.keys), int(model.hparams.num_classes)
    probs = torch.cat(branch) if branch else torch.empty(0, k, c)
    fused_probs = torch.cat(fused) if fused else torch.empty(0, c)
    return {**{key: probs[:, i] for i, key in enumerate(model.keys)}, FUSED: fused_probs}


def predictions_frame(
    names: Sequence[str],
    labels: torch.Tensor | None,
    probs_by_model: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
) -> pd.DataFrame:
    """One row per image: name, label, `<model>/<class>` probabilities (the test_predictions.csv layout)."""
    frame = pd.DataFrame({"name": list(names)})
    if labels is not None:
        frame["label"] = labels.numpy().astype(int)
    for model_name, probs in probs_by_model.items():
        for j, cls in enumerate(class_names):
            frame[f"{model_name}/{cls}"] = probs[:, j].numpy()
    return frame


def probs_from_frame(frame: pd.DataFrame, model_name: str = FUSED) -> np.ndarray:
    """The (N, C) probabilities of `model_name` from a predictions_frame."""
    cols = [c for c in frame.columns if c.startswith(f"{model_name}/")]
    if not cols:
        raise DataError(f"predictions have no '{model_name}/<class>' columns; found {list(frame.columns)}")
    return frame[cols].to_numpy(dtype=float)


# ---- metrics -------------------------------------------------------------------------------------------
def _binary_fns(threshold: float) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    kw = {"threshold": threshold, "validate_args": False}
    return {
        "acc": lambda p, y: tmf.binary_accuracy(p, y, **kw),
        "precision": lambda p, y: tmf.binary_precision(p, y, **kw),
        "recall": lambda p, y: tmf.binary_recall(p, y, **kw),
        "specificity": lambda p, y: tmf.binary_specificity(p, y, **kw),
        "f1": lambda p, y: tmf.binary_f1_score(p, y, **kw),
        "auroc": lambda p, y: tmf.binary_auroc(p, y, validate_args=False),
        "ap": lambda p, y: tmf.binary_average_precision(p, y, validate_args=False),
        "ece": lambda p, y: tmf.binary_calibration_error(p, y, validate_args=False),
    }


def _multiclass_fns(num_classes: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    kw = {"num_classes": num_classes, "average": "macro", "validate_args": False}
    return {
        "acc": lambda p, y: tmf.multiclass_accuracy(p, y, **kw),
        "precision": lambda p, y: tmf.multiclass_precision(p, y, **kw),
        "recall": lambda p, y: tmf.multiclass_recall(p, y, **kw),
        "specificity": lambda p, y: tmf.multiclass_specificity(p, y, **kw),
        "f1": lambda p, y: tmf.multiclass_f1_score(p, y, **kw),
        "auroc": lambda p, y: tmf.multiclass_auroc(p, y, **kw),
        "ap": lambda p, y: tmf.multiclass_average_precision(p, y, **kw),
        "ece": lambda p, y: tmf.multiclass_calibration_error(p, y, num_classes=num_classes, validate_args=False),
    }


def compute_metrics(labels: torch.Tensor, probs: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """acc, precision, recall, specificity, f1, auroc, ap (average precision), ece; binary or macro multiclass.

    auroc and ap are NaN when the labels hold one class only.
    """
    labels = labels.long()
    num_classes = probs.shape[1]
    if num_classes == 2:
        fns, scores = _binary_fns(threshold), probs[:, 1].contiguous()
    else:
        fns, scores = _multiclass_fns(num_classes), probs
    one_class = len(torch.unique(labels)) < 2
    return {
        name: (math.nan if one_class and name in RANKING_METRICS else float(fn(scores, labels)))
        for name, fn in fns.items()
    }


def bootstrap_intervals(
    labels: torch.Tensor, probs: torch.Tensor, threshold: float, n_resamples: int, seed: int, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric over `n_resamples` seeded resamples of the images."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    draws: dict[str, list[float]] = {m: [] for m in EVAL_METRICS}
    for _ in range(n_resamples):
        idx = torch.from_numpy(rng.integers(0, n, size=n))
        for name, value in compute_metrics(labels[idx], probs[idx], threshold).items():
            draws[name].append(value)
    alpha = (1.0 - level) / 2.0
    intervals = {}
    for name, values in draws.items():
        arr = np.asarray(values, dtype=float)
        arr = arr[~np.isnan(arr)]
        intervals[name] = (
            (float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))) if len(arr) else (math.nan, math.nan)
        )
    return intervals


def evaluate_predictions(
    labels: torch.Tensor,
    probs_by_model: Mapping[str, torch.Tensor],
    threshold: float | Mapping[str, float] = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Rows (model, metric, value, ci_low, ci_high) for every model; intervals are NaN when n_bootstrap=0.

    `threshold` is one value or one per model name (binary tasks).
    """
    if len(labels) == 0:
        raise DataError("no labelled images to evaluate")
    rows = []
    for model_name, probs in probs_by_model.items():
        threshold_of = threshold.get(model_name, 0.5) if isinstance(threshold, Mapping) else threshold
        values = compute_metrics(labels, probs, threshold_of)
        intervals = (
            bootstrap_intervals(labels, probs, threshold_of, n_bootstrap, seed)
            if n_bootstrap > 0
            else dict.fromkeys(values, (math.nan, math.nan))
        )
        for metric, value in values.items():
            lo, hi = intervals[metric]
            rows.append({"model": model_name, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def mlflow_metrics(results: pd.DataFrame, prefix: str) -> dict[str, float]:
    """`<prefix>/<model>/<metric>` plus `..._ci_low` / `..._ci_high`, finite values only."""
    out: dict[str, float] = {}
    for row in results.itertuples():
        for suffix, value in (("", row.value), ("_ci_low", row.ci_low), ("_ci_high", row.ci_high)):
            if value is not None and math.isfinite(float(value)):
                out[f"{prefix}/{row.model}/{row.metric}{suffix}"] = float(value)
    return out


def results_table(results: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Wide table: one row per model, one `value [low, high]` cell per metric."""

    def cell(row: pd.Series) -> str:
        if not math.isfinite(row.value):
            return "n/a"
        text = f"{row.value:.{digits}f}"
        if math.isfinite(row.ci_low):
            text += f" [{row.ci_low:.{digits}f}, {row.ci_high:.{digits}f}]"
        return text

    cells = results.assign(cell=results.apply(cell, axis=1))
    wide = cells.pivot(index="model", columns="metric", values="cell")
    order = [m for m in results["model"].unique()]
    return wide.loc[order, [m for m in EVAL_METRICS if m in wide.columns]].reset_index()


def trained_thresholds(model: FusionClassifier, override: float | None = None) -> dict[str, float]:
    """Per model name, the threshold chosen on validation at training time (or `override` for all of them).

    Each branch keeps its own threshold (`branch_thresholds`); checkpoints without them use the fused one.
    """
    fused = float(model.hparams.threshold) if override is None else float(override)
    own = dict(model.hparams.get("branch_thresholds") or {}) if override is None else {}
    return {**{k: float(own.get(k, fused)) for k in model.keys}, FUSED: fused}


# ---- the evaluate task ---------------------------------------------------------------------------------
def evaluate_model(
    model: FusionClassifier,
    data_cfg: Mapping,
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
    batch_size: int = 64,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every branch and the fused model on a split of any data config, decoded at the trained size.

    Returns (results rows of evaluate_predictions, predictions_frame).
    """
    from xrayfusion.data import XRayDataModule

    cfg = {**dict(data_cfg), "image_size": int(model.hparams.image_size)}
    dm = XRayDataModule(cfg)
    source = dm.prepare()
    data = getattr(source, split, None) if split in ("train", "val", "test") else None
    if data is None:
        raise ConfigError(f"split={split} is not available in data={cfg.get('name')}; use split=test, val or train")
    match_classes(list(model.hparams.class_names), source.class_names)
    probs = predict_images(model, data.images, batch_size)
    results = evaluate_predictions(data.labels, probs, trained_thresholds(model, threshold), n_bootstrap, seed)
    return results, predictions_frame(data.names, data.labels, probs, list(model.hparams.class_names))


def log_evaluation(
    tracking_uri: str, run_id: str, prefix: str, results: pd.DataFrame, predictions: pd.DataFrame
) -> None:
    """Log `<prefix>/<model>/<metric>` (with intervals) and `<prefix>/{metrics,predictions}.csv` into the run."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri)
    now = int(__import__("time").time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(results, prefix).items()]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])
    with tempfile.TemporaryDirectory() as tmp:
        results.to_csv(Path(tmp) / "metrics.csv", index=False)
        predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
        client.log_artifacts(run_id, tmp, prefix)
