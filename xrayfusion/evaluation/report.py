"""What training logs after its test pass besides the core metrics: predictions CSV, intervals, Grad-CAM, model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pytorch_lightning.loggers import MLFlowLogger

from xrayfusion import tracking
from xrayfusion.core.names import FUSED, METRIC_NAMES
from xrayfusion.data import ImageSet
from xrayfusion.evaluation import metrics
from xrayfusion.evaluation.gradcam import gradcam_figure
from xrayfusion.evaluation.plots import plt
from xrayfusion.models import FusionClassifier

log = logging.getLogger(__name__)

TEST_PREDICTIONS = "test_predictions.csv"
GRADCAM_PNG = "gradcam_test.png"


def log_test_report(
    logger: MLFlowLogger,
    model: FusionClassifier,
    test: ImageSet,
    outputs: dict[str, torch.Tensor],
    out_dir: Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    gradcam_images: int = 8,
) -> None:
    """Log `test_predictions.csv`, every metric's bootstrap interval (plus ap, ece) and the Grad-CAM grid."""
    probs = {k: outputs["probs"][:, i] for i, k in enumerate(model.keys)}
    probs[FUSED] = outputs["fused_probs"]
    labels = outputs["labels"]
    whole = len(test) == len(labels)  # under DDP a rank sees a share of the test set, in another order
    names = test.names if whole else [f"rank0-{i}" for i in range(len(labels))]
    frame = metrics.predictions_frame(names, labels, probs, list(model.hparams.class_names))
    csv = out_dir / TEST_PREDICTIONS
    frame.to_csv(csv, index=False)
    tracking.log_artifact(logger, csv)
    fused_threshold = float(model.hparams.threshold)
    chosen = {k: float(getattr(model.metrics["test"][k]["acc"], "threshold", fused_threshold)) for k in probs}
    results = metrics.evaluate_predictions(labels, probs, chosen, n_bootstrap, seed)
    logged = metrics.mlflow_metrics(results, "test")
    core = {f"test/{m}/{name}" for m in probs for name in METRIC_NAMES}
    logger.log_metrics({k: v for k, v in logged.items() if k not in core})  # the test pass logged the values
    if gradcam_images > 0 and not whole:
        log.warning("Grad-CAM skipped: the test outputs do not cover the whole test set (DDP)")
    elif gradcam_images > 0:
        fig = gradcam_figure(model, test.images, labels, outputs["fused_probs"], gradcam_images)
        path = out_dir / GRADCAM_PNG
        fig.savefig(path, dpi=110)
        plt.close(fig)
        tracking.log_artifact(logger, path, "plots")
