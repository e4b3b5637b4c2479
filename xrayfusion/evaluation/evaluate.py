"""The evaluate task: score every branch and the fused model of a trained ensemble on a split of any data config."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from xrayfusion.core.errors import ConfigError
from xrayfusion.data import XRayDataModule
from xrayfusion.evaluation.inference import predict
from xrayfusion.evaluation.loading import match_classes, trained_thresholds
from xrayfusion.evaluation.metrics import evaluate_predictions, mlflow_metrics, predictions_frame
from xrayfusion.models import FusionClassifier


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
    cfg = {**dict(data_cfg), "image_size": int(model.hparams.image_size)}
    dm = XRayDataModule(cfg)
    source = dm.prepare()
    data = getattr(source, split, None) if split in ("train", "val", "test") else None
    if data is None:
        raise ConfigError(f"split={split} is not available in data={cfg.get('name')}; use split=test, val or train")
    match_classes(list(model.hparams.class_names), source.class_names)
    probs = predict(model, data.images, batch_size).by_model()
    results = evaluate_predictions(data.labels, probs, trained_thresholds(model, threshold), n_bootstrap, seed)
    return results, predictions_frame(data.names, data.labels, probs, list(model.hparams.class_names))


def log_evaluation(
    tracking_uri: str, run_id: str, prefix: str, results: pd.DataFrame, predictions: pd.DataFrame
) -> None:
    """Log `<prefix>/<model>/<metric>` (with intervals) and `<prefix>/{metrics,predictions}.csv` into the run."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(results, prefix).items()]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])
    with tempfile.TemporaryDirectory() as tmp:
        results.to_csv(Path(tmp) / "metrics.csv", index=False)
        predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
        client.log_artifacts(run_id, tmp, prefix)
