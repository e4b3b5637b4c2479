"""Decision thresholds of a trained ensemble, chosen on validation predictions only (binary tasks).

Branch thresholds come from the branches' validation probabilities (the branches never trained on them).
The fused threshold does too, unless something the fused probabilities depend on was fitted on the validation
split (the fusion itself, or the branch temperatures of `fusion.calibrate=true`): then it is chosen on
cross-fitted fused probabilities (each validation patient predicted by temperatures and a fusion fitted
without it), so no choice is made on predictions those fits have seen.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from xrayfusion.core.errors import ConfigError
from xrayfusion.core.names import FUSED
from xrayfusion.data.splits import grouped_folds
from xrayfusion.evaluation.inference import Predictions
from xrayfusion.fusion import calibration, thresholds
from xrayfusion.models import FusionClassifier

INNER_FOLDS = 5
log = logging.getLogger(__name__)


def fitted_on_val(model: FusionClassifier) -> bool:
    """Whether the fusion was fitted on the validation split (`fusion.cv=holdout`)."""
    return bool(model.fusion.needs_fit and model.hparams.get("fusion_fitted_on") == "holdout")


def calibrated_on_val(model: FusionClassifier) -> bool:
    """Whether the fused probabilities depend on branch temperatures fitted on the validation split
    (`fusion.calibrate=true` records `calibrated_on=val`): not for a fusion of features (concat), nor for one
    binary branch seen once (its probability is monotone in its logit whatever the temperature, so neither its
    AUROC nor the decisions a threshold can make depend on it)."""
    if model.hparams.get("calibrated_on") != "val" or not model.fusion.uses_probs:
        return False
    return not (len(model.keys) == 1 and int(model.hparams.num_classes) == 2 and len(model.views) == 1)


def fuse_views(fusion: torch.nn.Module, view_probs: torch.Tensor) -> torch.Tensor:
    """Fused probabilities (N, C) of per-view branch probabilities (N, V, K, C), as the model fuses test-time
    views: each view fused, then the mean over views (not the same as fusing the mean for voting or stacking)."""
    with torch.no_grad():
        return torch.stack([fusion(view_probs[:, v], [])[0].float() for v in range(view_probs.shape[1])]).mean(0)


def refused(model: FusionClassifier, val: Predictions, batch_size: int) -> Predictions:
    """`val` (the model's predictions, by `predict` in batches of `batch_size`) with the fused probabilities the
    model's fusion gives now, e.g. after its weights changed: what predicting the same images again gives, to the
    bit, without running the backbones again (the branch outputs do not depend on the fusion). Every test-time view
    is fused as the model fuses it, batch by batch as `predict` ran. Fusions of probabilities only (`uses_probs`)."""
    if not model.fusion.uses_probs:
        raise ValueError(f"fusion {model.fusion.name!r} reads the branch features: predict the images again")
    if val.view_logits is None:  # one view: the model's own branch probabilities
        views = val.probs[:, None]
    else:
        views = calibration.view_probs(val.view_logits, model.temperature.cpu())
    parts = [fuse_views(model.fusion, views[i : i + batch_size]) for i in range(0, len(val), batch_size)]
    fused = torch.cat(parts) if parts else val.fused
    return Predictions(val.logits, val.probs, fused, val.labels, val.keys, val.view_logits)


def crossfit_fused(
    model: FusionClassifier, val: Predictions, groups: Sequence[str], seed: int, n_splits: int = INNER_FOLDS
) -> torch.Tensor:
    """Out-of-sample fused probabilities (N, C) of validation images for a model whose fusion (`fitted_on_val`)
    and/or branch temperatures (`calibrated_on_val`) were fitted on them: each fold's images are predicted with
    both refitted on the other folds (the temperatures on the plain view's logits, as `fusion.calibrate` fits
    them; the fusion on the branch probabilities averaged over views, as the run fits it), every test-time view
    fused as the model fuses them."""
    k = min(n_splits, len(set(groups)))
    refit_fusion, refit_temps = fitted_on_val(model), calibrated_on_val(model)
    logits = val.view_logits if val.view_logits is not None else val.logits[:, None]
    views = calibration.view_probs(logits, model.temperature.cpu()) if val.view_logits is not None else None
    fused = torch.empty_like(val.fused)
    for fit_idx, held_idx in grouped_folds(val.labels.tolist(), list(groups), k, seed):
        fold_views = views if views is not None else val.probs[:, None]  # one view: the model's own probabilities
        if refit_temps:
            temps = calibration.fit_temperatures(val.logits[fit_idx], val.labels[fit_idx])
            fold_views = calibration.view_probs(logits, temps)
        fusion = copy.deepcopy(model.fusion)
        if refit_fusion:
            probs = fold_views.mean(1) if refit_temps else val.probs
            fusion.fit(probs[fit_idx], val.labels[fit_idx], names=model.keys)
        fused[torch.as_tensor(held_idx)] = fuse_views(fusion, fold_views[held_idx])
    return fused


def crossfit_seed(model: FusionClassifier) -> int:
    """The seed of the validation folds a fusion fitted on validation is cross-fitted on: the data seed the
    model's split was made with (recorded in the checkpoint), so training and `evaluate split=val` use the same
    folds."""
    return int((model.hparams.get("data_split") or {}).get("seed", 0))


def held_out_fused(
    model: FusionClassifier, val: Predictions, groups: Sequence[str], seed: int
) -> tuple[torch.Tensor, str]:
    """Fused validation probabilities that no fit has seen, and what they are: `val` (neither the fusion nor the
    branch temperatures were fitted on validation), `val_crossfit<K>` (one or both were: each validation patient
    predicted by copies fitted on the others, `crossfit_fused`), `val_in_sample` (too few validation patients,
    or of one class, to cross-fit: the in-sample predictions, with a warning)."""
    if not (fitted_on_val(model) or calibrated_on_val(model)):
        return val.fused, "val"
    k = min(INNER_FOLDS, len(set(groups)))
    try:
        return crossfit_fused(model, val, groups, seed, k), f"val_crossfit{k}"
    except ConfigError as err:
        log.warning(
            "fused validation predictions are in-sample: cannot cross-fit what was fitted on validation (%s)", err
        )
        return val.fused, "val_in_sample"


def choose_thresholds(
    rule: Any,
    model: FusionClassifier,
    val: Predictions,
    groups: Sequence[str],
    seed: int,
    held_out: tuple[torch.Tensor, str] | None = None,
) -> tuple[dict[str, float], str]:
    """({model name: threshold}, where the fused one was chosen) for `rule` on validation predictions `val`;
    ({}, ...) for more than two classes (argmax decides). `held_out`: `held_out_fused`'s answer when the caller
    already has it (it is computed here otherwise)."""
    parsed = thresholds.parse_rule(rule)
    if int(model.hparams.num_classes) != 2:
        return {}, "argmax"
    # a fixed threshold is chosen on nothing; a rule on predictions the fitted fusion has not seen
    if isinstance(parsed, float):
        fused, where = val.fused, "val"
    else:
        fused, where = held_out or held_out_fused(model, val, groups, seed)
    chosen = {k: thresholds.choose_threshold(rule, val.probs[:, i, 1], val.labels) for i, k in enumerate(model.keys)}
    chosen[FUSED] = thresholds.choose_threshold(rule, fused[:, 1], val.labels)
    return chosen, where
