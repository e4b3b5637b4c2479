"""Test-time augmentation (model.tta): the views every eval-mode forward averages.

`none` is the image itself; `flips` adds its horizontal mirror; `scales` adds each branch's input resized by
every factor of `model.tta_scales` (e.g. 0.875 and 1.125 of the branch's size: the convolutional backbones pool
globally, so they take any size); `flips_scales` is every scale of the image and of its mirror. The first view
is always the image itself at scale 1, whose logits are the ones calibration fits. Views are applied inside the
model, so validation, test, evaluate, predict, the served model and the ONNX export average the same views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xrayfusion.core.errors import ConfigError

TTA_MODES = ("none", "flips", "scales", "flips_scales")
DEFAULT_SCALES = (0.875, 1.125)


@dataclass(frozen=True)
class View:
    """One test-time view: the image mirrored or not, each branch's input resized by `scale`."""

    flip: bool = False
    scale: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The view's images (the resize by `scale` happens per branch, see FusionClassifier.branch_input)."""
        return torch.flip(x, dims=[-1]) if self.flip else x

    def size(self, size: int) -> int:
        """A branch's input size in this view: size x scale rounded half up (0.875 x 36 = 31.5 -> 32)."""
        return max(1, int(size * self.scale + 0.5))


PLAIN = View()


def check_tta(mode: Any, scales: Any) -> tuple[float, ...]:
    """The extra scales of `mode` as floats (() for modes without scales); ConfigError naming the fix for an
    unknown mode or bad `model.tta_scales` (checked whatever the mode, so a bad value fails before training)."""
    if mode not in TTA_MODES:
        raise ConfigError(f"model.tta={mode!r} is unknown; choose one of {list(TTA_MODES)}")
    parsed = parse_scales(scales)
    return parsed if "scales" in str(mode) else ()


def parse_scales(scales: Any) -> tuple[float, ...]:
    """`model.tta_scales` as a tuple of distinct floats in [0.25, 4], none of them 1; ConfigError otherwise."""
    values = list(scales) if isinstance(scales, Sequence) and not isinstance(scales, str) else None
    out: tuple[float, ...] = ()
    if values and not any(isinstance(v, bool) for v in values):
        try:
            out = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            out = ()
    if not out or any(not 0.25 <= s <= 4.0 or s == 1.0 for s in out) or len(set(out)) < len(out):
        raise ConfigError(
            f"model.tta_scales={scales!r} must list distinct scales besides 1 (each between 0.25 and 4, not 1), "
            "e.g. 'model.tta_scales=[0.875,1.125]'"
        )
    return out


def tta_views(mode: str, scales: Sequence[float] = DEFAULT_SCALES) -> list[View]:
    """The views of `mode`, the plain image first: every scale of the image, then of its mirror (flips)."""
    extra = check_tta(mode, scales)
    flips = (False, True) if mode in ("flips", "flips_scales") else (False,)
    return [View(flip, s) for flip in flips for s in (1.0, *extra)]
