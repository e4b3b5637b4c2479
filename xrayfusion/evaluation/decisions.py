"""Decision thresholds of a trained ensemble, chosen on validation predictions only (binary tasks).

Branch thresholds come from the branches' validation probabilities (the branches never trained on them).
The fused threshold does too, unless the fusion itself was fitted on the validation split: then it is
chosen on cross-fitted fused probabilities (each validation patient predicted by a copy of the fusion
fitted without it), so no choice is made on predictions the fusion was fitted to.
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
from xrayfusion.fusion import thresholds
from xrayfusion.models import FusionClassifier

INNER_FOLDS = 5
log = logging.getLogger(__name__)


def crossfit_fused(
    model: FusionClassifier, val: Predictions, groups: Sequence[str], seed: int, n_splits: int = INNER_FOLDS
) -> torch.Tensor:
    """Out-of-sample fused probabilities (N, C) of validation images for a fusion fitted on them."""
    k = min(n_splits, len(set(groups)))
    fused = torch.empty_like(val.fused)
    for fit_idx, held_idx in grouped_folds(val.labels.tolist(), list(groups), k, seed):
        fusion = copy.deepcopy(model.fusion)
        fusion.fit(val.probs[fit_idx], val.labels[fit_idx], names=model.keys)
        with torch.no_grad():
            fused[torch.as_tensor(held_idx)] = fusion(val.probs[held_idx], [])[0].float()
    return fused


def crossfit_seed(model: FusionClassifier) -> int:
    """The seed of the validation folds a fusion fitted on validation is cross-fitted on: the data seed the
    model's split was made with (recorded in the checkpoint), so training and `evaluate split=val` use the same
    folds."""
    return int((model.hparams.get("data_split") or {}).get("seed", 0))


def held_out_fused(
    model: FusionClassifier, val: Predictions, groups: Sequence[str], seed: int
) -> tuple[torch.Tensor, str]:
    """Fused validation probabilities that no fit of the fusion has seen, and what they are: `val` (the fusion
    was not fitted on validation: not fitted, fitted out of fold, or not a fitted fusion), `val_crossfit<K>` (it
    was: each validation patient predicted by a copy fitted on the others), `val_in_sample` (too few validation
    patients, or of one class, to cross-fit: the in-sample predictions, with a warning)."""
    if not (model.fusion.needs_fit and model.hparams.get("fusion_fitted_on") == "holdout"):
        return val.fused, "val"
    k = min(INNER_FOLDS, len(set(groups)))
    try:
        return crossfit_fused(model, val, groups, seed, k), f"val_crossfit{k}"
    except ConfigError as err:
        log.warning("fused validation predictions are in-sample: cannot cross-fit the fusion (%s)", err)
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
