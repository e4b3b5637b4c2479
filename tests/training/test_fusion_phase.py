"""The fusion phase's decisions that need no training: the warning before a fit on a saturated validation split."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from xrayfusion.evaluation.inference import Predictions
from xrayfusion.training.fusion_phase import _warn_if_saturated


def _val(separation: float) -> Predictions:
    """Two branches on 40 validation images: `a` separates the classes by `separation`, `b` is noise."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 20)
    a = (labels * separation + torch.rand(40, generator=gen)).clamp(0, 1)
    b = torch.rand(40, generator=gen)
    p = torch.stack([a, b], dim=1)
    probs = torch.stack([1 - p, p], dim=2)
    return Predictions(probs.log(), probs, probs.mean(1), labels, ("a", "b"))


@pytest.mark.parametrize(("separation", "warned"), [(1.0, True), (0.2, False)])
def test_a_fit_on_a_saturated_validation_split_is_warned_about(caplog, separation: float, warned: bool) -> None:
    cfg = OmegaConf.create({"fusion": {"name": "average", "auto_cv": {"saturated_at": 0.995, "folds": 5}}})
    with caplog.at_level(logging.WARNING, logger="xrayfusion.training.fusion_phase"):
        _warn_if_saturated(cfg, SimpleNamespace(keys=("a", "b")), _val(separation))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert len(lines) == 1 and "saturated validation split (best branch a val AUROC 1.0000 >= 0.995)" in lines[0]
        assert "fusion.cv=auto" in lines[0]
    else:
        assert lines == []
