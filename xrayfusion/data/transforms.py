"""Augmentation on uint8 image tensors (decoded once; nothing is re-read from disk)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2


def build_augment(cfg: Mapping[str, Any] | None) -> v2.Transform | None:
    """Flip, small affine, brightness and contrast jitter, random erasing from a config mapping; None when disabled."""
    if not cfg or not cfg.get("enabled", True):
        return None
    ops: list[v2.Transform] = []
    if float(cfg.get("hflip", 0.0)) > 0:
        ops.append(v2.RandomHorizontalFlip(p=float(cfg["hflip"])))
    degrees = float(cfg.get("degrees", 0.0))
    translate = float(cfg.get("translate", 0.0))
    scale = cfg.get("scale")
    if degrees > 0 or translate > 0 or (scale and tuple(scale) != (1.0, 1.0)):
        ops.append(
            v2.RandomAffine(
                degrees=degrees,
                translate=(translate, translate) if translate > 0 else None,
                scale=tuple(scale) if scale else None,
            )
        )
    contrast, brightness = float(cfg.get("contrast", 0.0)), float(cfg.get("brightness", 0.0))
    if contrast > 0 or brightness > 0:
        ops.append(v2.ColorJitter(brightness=brightness or None, contrast=contrast or None))
    erasing = float(cfg.get("erasing", 0.0))
    if erasing > 0:  # a random rectangle of each image set to 0 with this probability (Zhong et al., 2020)
        ops.append(v2.RandomErasing(p=erasing, scale=(0.02, 0.2), value=0))
    return v2.Compose(ops) if ops else None


class TensorDataset(torch.utils.data.Dataset):
    """(image uint8 (1, H, W), label) pairs with an optional per-sample augmentation.

    `with_index=True` yields (image, label, index), for models that look cached features up by index;
    `images=False` (with it: every branch reads cached features) yields a 1x1 placeholder instead of the image,
    so nothing is copied or augmented."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: v2.Transform | None = None,
        with_index: bool = False,
        images_needed: bool = True,
    ):
        self.images = images
        self.labels = labels
        self.augment = augment
        self.with_index = with_index
        self.images_needed = images_needed
        self._placeholder = torch.zeros(images.shape[1], 1, 1, dtype=images.dtype) if images.ndim == 4 else None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, ...]:
        if self.images_needed or self._placeholder is None:
            image = self.images[idx]
            if self.augment is not None:
                image = self.augment(image)
        else:
            image = self._placeholder
        return (image, self.labels[idx], idx) if self.with_index else (image, self.labels[idx])
