"""Fusion strategies: each turns branch outputs into fused class probabilities.

`probs` is always (batch, n_branches, n_classes); strategies return (batch, n_classes) probabilities and,
when they have a trainable head (concat), the fused logits for the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from xrayfusion.errors import ConfigError

FusionOutput = tuple[torch.Tensor, torch.Tensor | None]


class Fusion(nn.Module):
    """Base strategy. `needs_fit` strategies are fitted on held-out branch probabilities after training."""

    name = "base"
    needs_fit = False

    def __init__(self, n_branches: int, num_classes: int):
        super().__init__()
        self.n_branches = n_branches
        self.num_classes = num_classes

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        raise NotImplementedError

    def fit(self, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Fit on held-out probabilities (N, K, C); returns params worth logging."""
        return {}


class AverageFusion(Fusion):
    """Mean of branch probabilities, optionally weighted (weights are normalised to sum to 1)."""

    name = "average"

    def __init__(self, n_branches: int, num_classes: int, weights: Sequence[float] | None = None):
        super().__init__(n_branches, num_classes)
        if weights is None:
            w = torch.full((n_branches,), 1.0 / n_branches)
        else:
            if len(weights) != n_branches or any(float(v) < 0 for v in weights) or sum(weights) <= 0:
                raise ConfigError(
                    f"fusion.weights={list(weights)} must be {n_branches} non-negative numbers (one per branch) "
                    "with a positive sum"
                )
            w = torch.tensor([float(v) for v in weights])
            w = w / w.sum()
        self.register_buffer("weights", w)

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        return torch.einsum("bkc,k->bc", probs, self.weights.to(probs.dtype)), None


class VotingFusion(Fusion):
    """Hard majority vote: fused probability = vote share, ties broken by mean probability. soft=True averages."""

    name = "voting"

    def __init__(self, n_branches: int, num_classes: int, soft: bool = False):
        super().__init__(n_branches, num_classes)
        self.soft = soft

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        mean = probs.mean(dim=1)
        if self.soft:
            return mean, None
        votes = nn.functional.one_hot(probs.argmax(dim=2), self.num_classes).sum(dim=1).to(probs.dtype)
        # votes dominate; the mean probability (< 1 vote at weight 0.5) only orders tied classes
        return (votes + 0.5 * mean) / (self.n_branches + 0.5), None


class ConcatFusion(Fusion):
    """Branch features concatenated, dropout, and a linear head trained end to end with the branches."""

    name = "concat"

    def __init__(self, n_branches: int, num_classes: int, feature_dims: Sequence[int], dropout: float = 0.2):
        super().__init__(n_branches, num_classes)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(int(sum(feature_dims)), num_classes)

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        logits = self.head(self.drop(torch.cat(list(features), dim=1)))
        return logits.softmax(dim=1), logits


def meta_features(probs: torch.Tensor) -> torch.Tensor:
    """Meta-learner inputs: the positive-class probability per branch (binary) or all class probabilities."""
    if probs.shape[2] == 2:
        return probs[:, :, 1]
    return probs.flatten(1)


class StackingFusion(Fusion):
    """Logistic-regression meta-learner over branch probabilities, stored as tensors (no pickle).

    Until fitted it returns the mean of branch probabilities.
    """

    name = "stacking"
    needs_fit = True

    def __init__(self, n_branches: int, num_classes: int, C: float = 1.0):
        super().__init__(n_branches, num_classes)
        self.C = float(C)
        n_in = n_branches if num_classes == 2 else n_branches * num_classes
        n_out = 1 if num_classes == 2 else num_classes
        self.register_buffer("coef", torch.zeros(n_out, n_in))
        self.register_buffer("intercept", torch.zeros(n_out))
        self.register_buffer("fitted", torch.tensor(False))

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        if not bool(self.fitted):
            return probs.mean(dim=1), None
        z = meta_features(probs) @ self.coef.to(probs.dtype).T + self.intercept.to(probs.dtype)
        if self.num_classes == 2:
            p1 = torch.sigmoid(z[:, 0])
            return torch.stack([1 - p1, p1], dim=1), None
        return z.softmax(dim=1), None

    def fit(self, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        x = meta_features(probs.float()).cpu().numpy()
        y = labels.cpu().numpy()
        present = np.unique(y)
        if len(present) < 2:
            raise ConfigError("stacking needs held-out predictions of at least two classes to fit the meta-learner")
        meta = LogisticRegression(C=self.C, max_iter=1000)
        meta.fit(x, y)
        coef = np.zeros(tuple(self.coef.shape))
        intercept = np.zeros(tuple(self.intercept.shape))
        if self.num_classes == 2:
            coef[:], intercept[:] = meta.coef_, meta.intercept_
        else:
            intercept[:] = -1e4  # classes absent from the held-out set are never predicted
            if len(present) == 2:  # sklearn fits one logit z; softmax([-z/2, z/2]) equals sigmoid(z)
                rows = [-0.5 * meta.coef_[0], 0.5 * meta.coef_[0]]
                biases = [-0.5 * meta.intercept_[0], 0.5 * meta.intercept_[0]]
            else:
                rows, biases = list(meta.coef_), list(meta.intercept_)
            for cls, row, bias in zip(meta.classes_, rows, biases, strict=True):
                coef[cls], intercept[cls] = row, bias
        self.coef.copy_(torch.from_numpy(coef))
        self.intercept.copy_(torch.from_numpy(intercept))
        self.fitted.fill_(True)
        return {f"stacking/coef_{i}": float(v) for i, v in enumerate(coef.reshape(-1))}


FUSIONS = ("concat", "average", "voting", "stacking")


def build_fusion(cfg: Mapping[str, Any], n_branches: int, num_classes: int, feature_dims: Sequence[int]) -> Fusion:
    """The strategy named by cfg['name'] for `n_branches` branches."""
    name = cfg.get("name")
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion {name!r}; choose fusion= one of {list(FUSIONS)}")
    if name in ("stacking", "voting") and n_branches < 2:
        raise ConfigError(
            f"fusion={name} needs at least two branches but model.branches has {n_branches}; "
            "add branches or use fusion=average"
        )
    if name == "concat":
        return ConcatFusion(n_branches, num_classes, feature_dims, float(cfg.get("dropout", 0.2)))
    if name == "average":
        weights = cfg.get("weights")
        return AverageFusion(n_branches, num_classes, list(weights) if weights is not None else None)
    if name == "voting":
        return VotingFusion(n_branches, num_classes, bool(cfg.get("soft", False)))
    return StackingFusion(n_branches, num_classes, float(cfg.get("C", 1.0)))
