"""Mixup / CutMix and label smoothing of a training batch (timm.data.Mixup): soft targets for the losses.

Training steps only (`FusionClassifier.training_step`); validation, test and serving never see it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from xrayfusion.core.errors import ConfigError

MIXUP_DEFAULTS: dict[str, float] = {
    "mixup_alpha": 0.0,  # Beta(alpha, alpha) mixing weight of two images (Zhang et al., 2018); 0: off
    "cutmix_alpha": 0.0,  # a box of one image pasted into another (Yun et al., 2019); 0: off
    "prob": 1.0,  # probability that a batch is mixed (when an alpha is > 0)
    "switch_prob": 0.5,  # with both alphas > 0: probability of CutMix instead of Mixup for a batch
    "label_smoothing": 0.0,  # targets (1 - s) * one-hot + s / C; works without mixing too
}


def mixup_settings(cfg: Mapping[str, Any] | None) -> dict[str, float]:
    """`model.mixup` completed with the defaults and checked; ConfigError names a bad key or value."""
    given = dict(cfg or {})
    unknown = sorted(set(given) - set(MIXUP_DEFAULTS))
    if unknown:
        raise ConfigError(f"model.mixup.{unknown[0]} is not a key; the keys are {list(MIXUP_DEFAULTS)}")
    settings = {k: float(default if given.get(k) is None else given[k]) for k, default in MIXUP_DEFAULTS.items()}
    for key in ("mixup_alpha", "cutmix_alpha"):
        if settings[key] < 0:
            raise ConfigError(f"model.mixup.{key}={settings[key]} must be >= 0 (0: off)")
    for key in ("prob", "switch_prob"):
        if not 0 <= settings[key] <= 1:
            raise ConfigError(f"model.mixup.{key}={settings[key]} must be a probability in [0, 1]")
    if not 0 <= settings["label_smoothing"] < 1:
        raise ConfigError(f"model.mixup.label_smoothing={settings['label_smoothing']} must be in [0, 1)")
    return settings


class BatchMixer:
    """Mixes a batch and returns soft targets: (images, hard labels (N,)) -> (images, targets (N, C)).

    With an alpha > 0 the images become float in [0, 1] (the model's preprocessing takes those as it takes
    uint8) and pairs (i, N-1-i) are mixed by timm.data.Mixup (batch mode); an odd last image stays unmixed.
    With label smoothing only, images are returned untouched and targets are smoothed one-hot rows.
    """

    def __init__(self, num_classes: int, settings: Mapping[str, float]) -> None:
        self.num_classes = int(num_classes)
        self.smoothing = float(settings["label_smoothing"])
        self.mixes = settings["mixup_alpha"] > 0 or settings["cutmix_alpha"] > 0
        self.mixup = (
            Mixup(
                mixup_alpha=settings["mixup_alpha"],
                cutmix_alpha=settings["cutmix_alpha"],
                prob=settings["prob"],
                switch_prob=settings["switch_prob"],
                label_smoothing=self.smoothing,
                num_classes=self.num_classes,
            )
            if self.mixes
            else None
        )

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Unmixed soft targets: smoothed one-hot rows (N, C)."""
        return mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.smoothing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None:
            return images, self.targets(labels)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clone()
        even = len(x) - len(x) % 2  # timm pairs image i with N-1-i and needs an even batch
        if even == 0:
            return x, self.targets(labels)
        _, mixed = self.mixup(x[:even], labels[:even])  # mixes the view x[:even] in place
        if even < len(x):
            mixed = torch.cat([mixed, self.targets(labels[even:])])
        return x, mixed


def build_mixer(cfg: Mapping[str, Any] | None, num_classes: int) -> BatchMixer | None:
    """The mixer of `model.mixup`, or None when it neither mixes nor smooths (the hard-label loss)."""
    settings = mixup_settings(cfg)
    if settings["mixup_alpha"] == 0 and settings["cutmix_alpha"] == 0 and settings["label_smoothing"] == 0:
        return None
    return BatchMixer(num_classes, settings)
