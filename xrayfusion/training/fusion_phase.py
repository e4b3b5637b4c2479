"""The fusion-fit phase after training: calibrate branches, fit the fusion on held-out probabilities, pick thresholds.

Everything here sees only predictions of images the branches did not train on: the validation split
(`fusion.cv=holdout`) or out-of-fold predictions of the training split (`fusion.cv=K`). The test split is
never used; the thresholds chosen on validation are applied unchanged on test.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig
from pytorch_lightning.loggers import MLFlowLogger

from xrayfusion import tracking
from xrayfusion.core.names import CROSSFIT_SECONDS, FUSED, FUSED_VAL_AUROC
from xrayfusion.data import XRayDataModule
from xrayfusion.evaluation import decisions
from xrayfusion.evaluation.diversity import diversity_metrics
from xrayfusion.evaluation.inference import Predictions, predict
from xrayfusion.evaluation.loading import trained_thresholds
from xrayfusion.evaluation.metrics import (
    bootstrap_intervals,
    branch_aurocs,
    compute_metrics,
    paired_difference_interval,
)
from xrayfusion.fusion import calibration, crossfit
from xrayfusion.models import FusionClassifier
from xrayfusion.training.folds import fold_fit_predict

log = logging.getLogger(__name__)


def write_predictions(
    path: Path,
    probs: torch.Tensor,
    labels: torch.Tensor,
    folds: Sequence[Any],
    names: Sequence[str],
    groups: Sequence[str],
    branch_keys: Sequence[str],
    class_names: Sequence[str],
) -> Path:
    """One CSV row per image: name, patient, fold, label and each branch's probability of each class."""
    columns = [f"{k}/{c}" for k in branch_keys for c in class_names]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "patient", "fold", "label", *columns])
        flat = probs.reshape(len(probs), -1).tolist()
        for i, row in enumerate(flat):
            writer.writerow([names[i], groups[i], folds[i], int(labels[i]), *(f"{v:.6f}" for v in row)])
    return path


def _val(model: FusionClassifier, dm: XRayDataModule) -> Predictions:
    """Validation predictions; frozen branches read their cached features (model.feature_cache)."""
    store = dm.feature_store
    features = store.eval_features("val", len(model.views)) if store is not None else None
    return predict(model, dm.split("val"), dm.batch_size, features)


def calibrate(model: FusionClassifier, dm: XRayDataModule, logger: MLFlowLogger) -> Predictions:
    """Fit one temperature per branch on validation logits; log temperatures and validation ECE before/after."""
    val = _val(model, dm)
    temps = calibration.fit_temperatures(val.logits, val.labels)
    metrics = {
        f"calibration/{k}/val_ece_before": calibration.expected_calibration_error(val.probs[:, i], val.labels)
        for i, k in enumerate(model.keys)
    }
    model.temperature.copy_(temps)
    model.hparams.calibrated_on = "val"  # stored: the fused validation score and threshold then cross-fit them
    val = _val(model, dm)
    for i, k in enumerate(model.keys):
        metrics[f"calibration/{k}/val_ece_after"] = calibration.expected_calibration_error(val.probs[:, i], val.labels)
    tracking.log_params(logger, calibration.temperature_params(model.keys, temps))
    logger.log_metrics(metrics)
    log.info("calibration: temperatures %s", {k: round(float(t), 3) for k, t in zip(model.keys, temps, strict=True)})
    return val


def _warn_if_saturated(cfg: DictConfig, model: FusionClassifier, val: Predictions) -> None:
    """One warning line when the fusion is about to be fitted on a validation split its best branch already ranks
    (almost) perfectly (`fusion.auto_cv.saturated_at`, the `fusion.cv=auto` rule): too few mistakes there to
    learn from, so the fit tends to copy that branch."""
    saturated_at, _ = crossfit.auto_settings(cfg.fusion.get("auto_cv"))  # checked before training
    found = crossfit.best_branch(branch_aurocs(val.labels, val.probs, model.keys))
    if found is not None and found[1] >= saturated_at:
        log.warning(
            "fitting %s on a saturated validation split (best branch %s val AUROC %.4f >= %s): it holds too few "
            "mistakes to learn from and the fit tends to copy that branch; fusion.cv=auto decides where to fit "
            "it instead, fusion.prefer_equal=true whether to keep equal weights (docs/fusion.md)",
            cfg.fusion.name,
            found[0],
            found[1],
            saturated_at,
        )


def _choose_cv(cfg: DictConfig, model: FusionClassifier, val: Predictions, logger: MLFlowLogger) -> int | None:
    """fusion.cv=auto: holdout, K out-of-fold folds or no fit, from the branches' validation AUROCs (logged)."""
    saturated_at, folds = crossfit.auto_settings(cfg.fusion.get("auto_cv"))
    n_splits, reason = crossfit.choose_cv(branch_aurocs(val.labels, val.probs, model.keys), saturated_at, folds)
    tracking.log_params(logger, {"fusion/cv_rule": "auto", "fusion/cv_reason": reason})
    log.info("fusion.cv=auto: %s", reason)
    return n_splits


def _score(
    cfg: DictConfig, labels: torch.Tensor, fused: torch.Tensor, groups: Sequence[str], seed: int
) -> tuple[float, tuple[float, float] | None]:
    """The fused validation AUROC of held-out probabilities `fused`, and its 95% interval (None with
    `metrics.bootstrap=0` or when undefined): how far validation can tell recipes apart, a bootstrap over the
    validation patients (the split's unit) seeded by the split's seed, so runs on one split draw the same
    resamples."""
    auroc = float(compute_metrics(labels, fused)["auroc"])
    n_resamples = int(cfg.metrics.get("bootstrap", 0) or 0)
    if n_resamples <= 0:
        return auroc, None
    drawn = bootstrap_intervals(labels, fused, 0.5, n_resamples, seed, groups=groups)
    return auroc, (drawn["auroc"] if all(map(math.isfinite, drawn["auroc"])) else None)


def _prefer_equal(
    cfg: DictConfig,
    model: FusionClassifier,
    val: Predictions,
    batch_size: int,
    groups: Sequence[str],
    logger: MLFlowLogger,
    params: dict[str, Any],
) -> tuple[Predictions, str, dict[str, Any]]:
    """fusion.prefer_equal: equal weights instead of the learned ones unless validation shows the learned ones
    better. Both are scored on held-out validation predictions (the learned weights cross-fitted when they were
    fitted on validation, the equal average fitted on nothing) and the learned weights stay only when the 95%
    paired bootstrap interval (the validation patients resampled) of learned-minus-equal AUROC lies above 0;
    without an interval they stay too. Returns the validation predictions of the weights kept, where they were
    fitted (`none` for equal weights) and their params; logs both scores, the interval and the decision
    (`fusion/prefer_equal_choice`). `val`: the model's validation predictions (`_val`, in batches of
    `batch_size`) under any weights: both candidates' are their branch outputs fused again (`decisions.refused`,
    the same to the bit as predicting again, without the backbones' passes)."""
    seed = decisions.crossfit_seed(model)
    fitted_on, fitted = str(model.hparams.fusion_fitted_on), model.fusion.weights.clone()
    learned_val = decisions.refused(model, val, batch_size)
    learned_fused = decisions.held_out_fused(model, learned_val, groups, seed)[0]
    model.fusion.weights.fill_(1.0 / len(model.keys))
    model.hparams.fusion_fitted_on = "none"
    equal_val = decisions.refused(model, val, batch_size)
    equal_fused = decisions.held_out_fused(model, equal_val, groups, seed)[0]
    labels = learned_val.labels
    learned = float(compute_metrics(labels, learned_fused)["auroc"])
    equal = float(compute_metrics(labels, equal_fused)["auroc"])
    n_resamples = int(cfg.metrics.get("bootstrap", 0) or 0)
    low, high = (
        paired_difference_interval(labels, learned_fused, equal_fused, "auroc", n_resamples, seed, groups=groups)
        if n_resamples > 0
        else (math.nan, math.nan)
    )
    scores = f"AUROC {learned:.5f} learned vs {equal:.5f} equal"
    metrics = {"fusion/learned_val_auroc": learned, "fusion/equal_val_auroc": equal}
    if not (math.isfinite(low) and math.isfinite(high)):
        verdict = f"learned weights: no interval to compare them with (metrics.bootstrap=0, or undefined); {scores}"
        log.warning("fusion.prefer_equal: %s", verdict)
        keep_equal = False
    else:
        metrics |= {"fusion/learned_minus_equal_ci_low": low, "fusion/learned_minus_equal_ci_high": high}
        keep_equal = low <= 0.0
        interval = f"learned minus equal, 95% paired interval [{low:.5f}, {high:.5f}]"
        verdict = (
            f"equal weights: validation cannot tell the learned ones better ({scores}; {interval})"
            if keep_equal
            else f"learned weights: better than equal ones on validation ({scores}; {interval})"
        )
        log.info("fusion.prefer_equal: %s (learned %s)", verdict, params)
    logger.log_metrics(metrics)
    tracking.log_params(logger, {"fusion/prefer_equal_choice": verdict})
    if keep_equal:
        return equal_val, "none", model.fusion.weight_params(model.keys)
    model.fusion.weights.copy_(fitted)
    model.hparams.fusion_fitted_on = fitted_on
    return learned_val, fitted_on, params


class FusionOutcome(NamedTuple):
    """What the fusion phase decided: where the fused threshold was chosen (`val`, `val_crossfit5`; `argmax` for
    more than two classes), the final fused model's validation AUROC on predictions its fit has not seen
    (`fusion/val_auroc`), what those are (`val`, `val_crossfit5`: `decisions.held_out_fused`), and the AUROC's
    95% bootstrap interval over the validation patients (None with `metrics.bootstrap=0` or when undefined)."""

    threshold_on: str
    val_auroc: float
    val_auroc_on: str
    val_auroc_ci: tuple[float, float] | None


def fit_fusion(
    cfg: DictConfig, model: FusionClassifier, dm: XRayDataModule, logger: MLFlowLogger, out_dir: Path
) -> FusionOutcome:
    """Calibrate (fusion.calibrate), fit the fusion (fusion.cv), choose thresholds (metrics.threshold), log the
    final fused validation AUROC (`fusion/val_auroc`) and the branches' diversity on validation
    (`val/diversity/...`)."""
    source = dm.prepare()
    calibrate_on = bool(cfg.fusion.get("calibrate", False))
    val = calibrate(model, dm, logger) if calibrate_on else None
    rule = crossfit.parse_cv(cfg.fusion.get("cv", "holdout"))
    n_splits = rule if isinstance(rule, int) else None  # holdout, or auto until decided below
    if model.fusion.needs_fit and rule == crossfit.AUTO:
        val = val or _val(model, dm)
        n_splits = _choose_cv(cfg, model, val, logger)
    if model.fusion.needs_fit and n_splits == 0:  # fusion.cv=auto on a saturated validation, auto_cv.folds=0
        model.hparams.fusion_fitted_on = "none"
        weights = model.fusion.weight_params(model.keys)
        tracking.log_params(logger, {"fusion/fitted_on": "none", **weights})
        log.info("fusion not fitted (validation saturated, fusion.auto_cv.folds=0): equal weights %s", weights)
    elif model.fusion.needs_fit:
        if n_splits is None:
            val = val or _val(model, dm)
            held, probs, labels, folds = source.val, val.probs, val.labels, ["holdout"] * len(val.labels)
            if rule != crossfit.AUTO:
                _warn_if_saturated(cfg, model, val)
        else:
            started = time.perf_counter()
            log.info("cross-fitting %s on %d folds of %d training images", cfg.fusion.name, n_splits, len(source.train))
            # folds train with the final model's recipe and precisions (training.factory)
            fit_predict = fold_fit_predict(cfg, dm, logger, out_dir, n_splits, calibrate_on, model.bf16_branch_names)
            probs, fold_of = crossfit.cross_fit(
                source.train.labels.tolist(), source.train.groups, n_splits, int(cfg.seed), fit_predict
            )
            held, labels, folds = source.train, source.train.labels, (fold_of + 1).tolist()
            logger.log_metrics({CROSSFIT_SECONDS: time.perf_counter() - started})
        params = model.fusion.fit(probs, labels, names=model.keys)
        fitted_on = "holdout" if n_splits is None else f"oof_cv{n_splits}"
        model.hparams.fusion_fitted_on = fitted_on  # stored: evaluate's threshold rules need it
        log.info("fusion fitted on %d held-out predictions: %s", len(labels), params)
        path = write_predictions(
            out_dir / "oof_predictions.csv", probs, labels, folds, held.names, held.groups, model.keys, dm.class_names
        )
        tracking.log_artifact(logger, path)
        branch_val, val = val, None  # the fused probabilities changed (the branch outputs did not)
        if cfg.fusion.get("prefer_equal", False) and model.fusion.name == "average":  # learned weights
            branch_val = branch_val if branch_val is not None else _val(model, dm)
            val, fitted_on, params = _prefer_equal(
                cfg, model, branch_val, dm.batch_size, source.val.groups, logger, params
            )
        tracking.log_params(logger, {"fusion/fitted_on": fitted_on})
        tracking.log_params(logger, params)
    val = val or _val(model, dm)
    # the fused validation predictions no fit of the fusion has seen: for the threshold rule and the final score
    seed = decisions.crossfit_seed(model)
    held_out = decisions.held_out_fused(model, val, source.val.groups, seed)
    chosen, fused_on = decisions.choose_thresholds(cfg.metrics.threshold, model, val, source.val.groups, seed, held_out)
    tracking.log_params(logger, {"threshold/rule": str(cfg.metrics.threshold), "threshold/chosen_on": "val"})
    tracking.log_params(logger, {"threshold/fused_chosen_on": fused_on})
    if chosen:
        model.hparams.threshold = chosen[FUSED]
        model.hparams.branch_thresholds = {k: chosen[k] for k in model.keys}  # saved in the checkpoint
        # exact: the float32 the decision rule compares with, so the logged predictions and these params give the
        # logged metrics even for a probability that lies on the threshold (rounding could flip it)
        tracking.log_params(logger, {f"threshold/{k}": str(np.float32(v)) for k, v in chosen.items()})
    log.info(
        "thresholds (metrics.threshold=%s, branches on val, fused on %s): %s", cfg.metrics.threshold, fused_on, chosen
    )
    # the final fused model's validation AUROC on predictions its fit has not seen (best/val/fused/auroc is the
    # best epoch's, before the fusion was fitted): what a recipe with a fitted fusion should be compared on
    val_auroc, interval = _score(cfg, val.labels, held_out[0], source.val.groups, seed)
    logger.log_metrics({FUSED_VAL_AUROC: val_auroc})
    if interval:
        logger.log_metrics({f"{FUSED_VAL_AUROC}_ci_low": interval[0], f"{FUSED_VAL_AUROC}_ci_high": interval[1]})
    tracking.log_params(logger, {"fusion/val_auroc_on": held_out[1]})
    # how differently the final branches decide on validation, at their thresholds (ensembles only)
    diversity = diversity_metrics("val", val.labels, val.probs, model.keys, trained_thresholds(model))
    if diversity:
        logger.log_metrics(diversity)
    return FusionOutcome(fused_on, val_auroc, held_out[1], interval)
