"""The one inference path: a trained ensemble's outputs for images, in eval mode, as a small dataclass.

Fusion fitting, thresholds, cross-fit folds, evaluate, predict, the served model and the benchmark all
predict through `predict`, so every number they report comes from the same forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from xrayfusion.core.modes import eval_mode
from xrayfusion.core.names import FUSED
from xrayfusion.data import ImageSet
from xrayfusion.data.transforms import TensorDataset
from xrayfusion.models import FusionClassifier


@dataclass(frozen=True)
class Predictions:
    """Outputs for N images: raw branch logits and branch probabilities (N, K, C; temperature applied),
    fused probabilities (N, C), labels (N,) when known, and the branch keys in K order."""

    logits: torch.Tensor
    probs: torch.Tensor
    fused: torch.Tensor
    labels: torch.Tensor | None
    keys: tuple[str, ...]

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


def predict(model: FusionClassifier, data: torch.Tensor | ImageSet | DataLoader, batch_size: int = 64) -> Predictions:
    """Predict uint8 images (N, 1, H, W), an ImageSet or a loader of (images, labels) batches, in eval mode."""
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "probs": [], "fused": [], "labels": []}
    with eval_mode(model):
        for x, y in _batches(data, batch_size):
            out = model(x.to(model.device))
            parts["logits"].append(out["logits"].float().cpu())
            parts["probs"].append(out["probs"].float().cpu())
            parts["fused"].append(out["fused_probs"].float().cpu())
            if y is not None:
                parts["labels"].append(torch.as_tensor(y).cpu())
    k, c = len(model.keys), int(model.hparams.num_classes)
    logits = torch.cat(parts["logits"]) if parts["logits"] else torch.empty(0, k, c)
    probs = torch.cat(parts["probs"]) if parts["probs"] else torch.empty(0, k, c)
    fused = torch.cat(parts["fused"]) if parts["fused"] else torch.empty(0, c)
    labels = torch.cat(parts["labels"]) if parts["labels"] else None
    return Predictions(logits, probs, fused, labels, tuple(model.keys))
