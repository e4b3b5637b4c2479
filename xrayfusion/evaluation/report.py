"""The test report of a training: the final model's test predictions through the one inference path, scored
with the same functions as `evaluate`, logged as metrics, `test_predictions.csv`, plots and Grad-CAM."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from pytorch_lightning.loggers import MLFlowLogger

from xrayfusion import tracking
from xrayfusion.core.names import FUSED, predict_labels
from xrayfusion.data import ImageSet
from xrayfusion.evaluation import metrics, plots
from xrayfusion.evaluation.diversity import diversity_metrics
from xrayfusion.evaluation.gradcam import gradcam_figure
from xrayfusion.evaluation.inference import Predictions, predict
from xrayfusion.evaluation.loading import trained_thresholds
from xrayfusion.models import FusionClassifier

log = logging.getLogger(__name__)

TEST_PREDICTIONS = "test_predictions.csv"
GRADCAM_PNG = "gradcam_test.png"


def log_figure(logger: MLFlowLogger, fig: Any, out_dir: Path, name: str) -> Path:
    """Save a figure into `out_dir` and log it under the run's `plots/`."""
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plots.plt.close(fig)
    tracking.log_artifact(logger, path, "plots")
    return path


def log_test_report(
    logger: MLFlowLogger,
    model: FusionClassifier,
    test: ImageSet,
    out_dir: Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    gradcam_images: int = 8,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Predict the test split once and log from those predictions: `test/<model>/<metric>` (+ 95% intervals),
    the branches' diversity `test/diversity/...`, `test_predictions.csv`, the confusion matrix and ROC plots and
    the Grad-CAM grid. Returns the results rows.

    The thresholds are the ones chosen on validation and stored with the model, so `evaluate`, `predict`
    and the served model decide exactly as this report does.
    """
    preds: Predictions = predict(model, test, batch_size)
    probs = preds.by_model()
    class_names = list(model.hparams.class_names)
    frame = metrics.predictions_frame(test.names, test.labels, probs, class_names)
    csv = out_dir / TEST_PREDICTIONS
    frame.to_csv(csv, index=False)
    tracking.log_artifact(logger, csv)
    decide = trained_thresholds(model)
    results = metrics.evaluate_predictions(test.labels, probs, decide, n_bootstrap, seed)
    logger.log_metrics(metrics.mlflow_metrics(results, "test"))
    diversity = diversity_metrics("test", test.labels, preds.probs, model.keys, decide)
    if diversity:  # ensembles (two branches or more)
        logger.log_metrics(diversity)
    predicted = predict_labels(preds.fused, float(model.hparams.threshold))
    log_figure(
        logger, plots.confusion_matrix_figure(test.labels, predicted, class_names), out_dir, "confusion_matrix_test.png"
    )
    log_figure(logger, plots.roc_figure(test.labels, probs), out_dir, "roc_test.png")
    if gradcam_images > 0:
        log_figure(
            logger, gradcam_figure(model, test.images, test.labels, preds.fused, gradcam_images), out_dir, GRADCAM_PNG
        )
    auroc = results[results["metric"] == "auroc"].set_index("model")["value"]
    log.info("test auroc: %s", {m: round(float(auroc.get(m, float("nan"))), 4) for m in [*model.keys, FUSED]})
    return results
