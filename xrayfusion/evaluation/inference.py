"""The one inference path: a trained ensemble's outputs for images, in eval mode, as a small dataclass.

Fusion fitting, thresholds, cross-fit folds, evaluate, predict, the served model and the benchmark all
predict through `predict`, so every number they report comes from the same forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from xrayfusion.core.modes import eval_mode
from xrayfusion.core.names import FUSED
from xrayfusion.data import ImageSet
from xrayfusion.data.transforms import TensorDataset
from xrayfusion.models import FusionClassifier
from xrayfusion.models.feature_cache import split_views


@dataclass(frozen=True)
class Predictions:
    """Outputs for N images: raw branch logits and branch probabilities (N, K, C; temperature applied),
    fused probabilities (N, C), labels (N,) when known, the branch keys in K order, and the raw branch logits of
    every test-time view (N, V, K, C; view 0 is the image itself, whose logits are `logits`; None: `logits` is
    the only view)."""

    logits: torch.Tensor
    probs: torch.Tensor
    fused: torch.Tensor
    labels: torch.Tensor | None
    keys: tuple[str, ...]
    view_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.fused.shape[0])

    def by_model(self) -> dict[str, torch.Tensor]:
        """(N, C) probabilities per model name: each branch key, then `fused`."""
        return {**{k: self.probs[:, i] for i, k in enumerate(self.keys)}, FUSED: self.fused}


def loader_of(images: ImageSet, batch_size: int) -> DataLoader:
    """An unshuffled, un-augmented loader of (image, label) over an ImageSet."""
    return DataLoader(TensorDataset(images.images, images.labels, None), batch_size=batch_size, shuffle=False)


def _batches(data: torch.Tensor | ImageSet | DataLoader, batch_size: int) -> Iterable[tuple[torch.Tensor, object]]:
    if isinstance(data, ImageSet):
        data = loader_of(data, batch_size)
    if isinstance(data, torch.Tensor):
        return ((data[i : i + batch_size], None) for i in range(0, len(data), batch_size))
    return ((x, y) for x, y in data)


def predict(
    model: FusionClassifier,
    data: torch.Tensor | ImageSet | DataLoader,
    batch_size: int = 64,
    features: Mapping[str, torch.Tensor] | None = None,
) -> Predictions:
    """Predict uint8 images (N, 1, H, W), an ImageSet or a loader of (images, labels) batches, in eval mode.

    `features` (branch key -> (T, N, D), one row per test-time view of each of the N images in order; see
    models/feature_cache.FeatureStore) are cached pooled features of frozen branches, used in place of running
    those backbones: the same forward, given what the backbones would compute (training-time passes only;
    evaluate, predict and the served model always run the backbones)."""
    if features is not None and isinstance(data, DataLoader):
        raise ValueError("cached features need the images in order: pass a tensor or an ImageSet, not a loader")
    for key, table in (features or {}).items():
        if table.shape[0] != len(model.views) or table.shape[1] != len(data):
            raise ValueError(
                f"cached features of {key} have {tuple(table.shape[:2])} (views, images); the model has "
                f"{len(model.views)} test-time views and the data {len(data)} images"
            )
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "views": [], "probs": [], "fused": [], "labels": []}
    start = 0
    with eval_mode(model):
        for x, y in _batches(data, batch_size):
            cached, others = (
                split_views({k: v[:, start : start + len(x)] for k, v in features.items()}, model.device)
                if features
                else (None, None)
            )
            start += len(x)
            out = model(x.to(model.device), cached, others)
            parts["logits"].append(out["logits"].float().cpu())
            if out.get("view_logits") is not None:  # test-time augmentation: what recalibrating needs
                parts["views"].append(out["view_logits"].float().cpu())
            parts["probs"].append(out["probs"].float().cpu())
            parts["fused"].append(out["fused_probs"].float().cpu())
            if y is not None:
                parts["labels"].append(torch.as_tensor(y).cpu())
    k, c = len(model.keys), int(model.hparams.num_classes)
    logits = torch.cat(parts["logits"]) if parts["logits"] else torch.empty(0, k, c)
    probs = torch.cat(parts["probs"]) if parts["probs"] else torch.empty(0, k, c)
    fused = torch.cat(parts["fused"]) if parts["fused"] else torch.empty(0, c)
    labels = torch.cat(parts["labels"]) if parts["labels"] else None
    views = torch.cat(parts["views"]) if parts["views"] else None
    return Predictions(logits, probs, fused, labels, tuple(model.keys), views)
