"""The evaluate task: score every branch and the fused model of a trained ensemble on a split of any data config."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.core.names import FUSED
from xrayfusion.data import ImageSet, XRayDataModule
from xrayfusion.evaluation import decisions, diversity
from xrayfusion.evaluation.inference import predict
from xrayfusion.evaluation.loading import match_classes, trained_thresholds
from xrayfusion.evaluation.metrics import evaluate_predictions, mlflow_metrics, predictions_frame
from xrayfusion.fusion import thresholds
from xrayfusion.models import FusionClassifier

log = logging.getLogger(__name__)


def run_split(model: FusionClassifier, why: str = "split=val|train") -> dict[str, Any]:
    """The data seed and val_fraction the model's training split its data with."""
    record = model.hparams.get("data_split")
    if not record or not record.get("val_digest"):
        raise DataError(
            "this checkpoint does not record its training's validation split (trained before xrayfusion stored it), "
            f"so {why} cannot use it faithfully; use split=test with the trained thresholds, or retrain"
        )
    return {"seed": int(record["seed"]), "val_fraction": float(record["val_fraction"])}


def check_run_split(model: FusionClassifier, val: ImageSet | None, cfg: Mapping[str, Any]) -> None:
    """DataError unless `val` holds exactly the validation images the model's training used."""
    expected = model.hparams["data_split"]["val_digest"]
    if val is None or val.digest() != expected:
        raise DataError(
            f"data={cfg.get('name')} (root={cfg.get('root')}) does not give this run's validation split (digest "
            f"{val.digest() if val is not None else 'none'} vs the run's {expected}): point data= and data.root at "
            "the data the run was trained on, or use split=test"
        )


class Evaluation(NamedTuple):
    """What `evaluate_model` gives: the metric rows, the per-image predictions and the branches' diversity."""

    results: pd.DataFrame
    predictions: pd.DataFrame
    # `branch_diversity` at the thresholds the rows were scored at: pairwise disagreement and error correlation,
    # and their means; {} for a one-branch model
    diversity: dict[str, float]


def evaluate_model(
    model: FusionClassifier,
    data_cfg: Mapping,
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float | str | None = None,
    batch_size: int = 64,
) -> Evaluation:
    """Score every branch and the fused model on a split of any data config, decoded at the trained size.

    `threshold`: None = the thresholds chosen at training time; a number for every model; or a rule
    (youden, sensitivity@0.95) chosen on the run's own validation split, which `data_cfg` must then give.
    With split=val, a fusion (or the branch temperatures it reads) fitted on validation is scored on
    cross-fitted fused predictions (`decisions.held_out_fused`), so its fused AUROC is the run's
    `fusion/val_auroc`. Intervals resample the patients on split=val and train (val with the split's seed, so
    the fused AUROC's interval is the run's `fusion/val_auroc_ci_*` for the same number of resamples), the
    images on test.
    Returns the rows of evaluate_predictions, the predictions_frame and the branches' diversity (as the training
    run logs it for its validation and test predictions), at the same thresholds.
    """
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split={split} is unknown; use split=test, val or train")
    rule = None if threshold is None else thresholds.parse_rule(threshold)
    needs_val = split != "test" or isinstance(rule, str)
    cfg = {**dict(data_cfg), "image_size": int(model.hparams.image_size)}
    if needs_val:
        cfg.update(run_split(model, "split=val|train" if split != "test" else f"metrics.threshold={threshold}"))
    dm = XRayDataModule(cfg)
    source = dm.prepare()
    data = getattr(source, split, None)
    if data is None:
        raise ConfigError(f"split={split} is not available in data={cfg.get('name')}; use split=test, val or train")
    if needs_val:
        check_run_split(model, source.val, cfg)
    match_classes(list(model.hparams.class_names), source.class_names)
    val = predict(model, source.val, batch_size) if split == "val" or isinstance(rule, str) else None
    held_out = None
    if split == "val":
        # a fusion or temperatures fitted on validation are scored there on predictions no fit has seen, as the
        # training scored it (fusion/val_auroc): in-sample fused scores would flatter it
        held_out = decisions.held_out_fused(model, val, source.val.groups, decisions.crossfit_seed(model))
        probs = {**val.by_model(), FUSED: held_out[0]}
        log.info("fused validation predictions: %s", held_out[1])
    else:
        probs = predict(model, data.images, batch_size).by_model()
    if isinstance(rule, str):
        chosen, where = decisions.choose_thresholds(
            rule, model, val, source.val.groups, decisions.crossfit_seed(model), held_out
        )
        log.info(
            "thresholds (metrics.threshold=%s, chosen on the run's val split; fused on %s): %s", rule, where, chosen
        )
        decide = chosen or trained_thresholds(model)
    else:
        decide = trained_thresholds(model, rule)
    # the run's own splits were carved by patient: resample patients there; the validation split with its own
    # seed, as the run's logged validation score interval (fusion/val_auroc_ci_*) was drawn
    groups = data.groups if split != "test" else None
    seed = decisions.crossfit_seed(model) if split == "val" else seed
    results = evaluate_predictions(data.labels, probs, decide, n_bootstrap, seed, groups)
    branch_probs = torch.stack([probs[k] for k in model.keys], dim=1)  # (N, K, C)
    pairs = diversity.branch_diversity(data.labels, branch_probs, model.keys, decide)
    frame = predictions_frame(data.names, data.labels, probs, list(model.hparams.class_names))
    return Evaluation(results, frame, pairs)


def log_evaluation(tracking_uri: str, run_id: str, prefix: str, evaluation: Evaluation) -> None:
    """Log `<prefix>/<model>/<metric>` (with intervals), `<prefix>/diversity/<pair>/<metric>` and the means (finite
    values; what `compare prefix=<prefix>` shows) and `<prefix>/{metrics,predictions}.csv` into the run."""
    import mlflow
    from mlflow.entities import Metric

    results, predictions = evaluation.results, evaluation.predictions
    client = mlflow.MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    values = {**mlflow_metrics(results, prefix), **diversity.as_metrics(prefix, evaluation.diversity)}
    metrics = [Metric(k, v, now, 0) for k, v in values.items()]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])
    with tempfile.TemporaryDirectory() as tmp:
        results.to_csv(Path(tmp) / "metrics.csv", index=False)
        predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
        client.log_artifacts(run_id, tmp, prefix)
