"""Fusion strategies: each turns branch outputs into fused class probabilities.

`probs` is always (batch, n_branches, n_classes); strategies return (batch, n_classes) probabilities and,
when they have a trainable head (concat), the fused logits for the loss.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

from xrayfusion.errors import ConfigError
from xrayfusion.models import meta as meta_mod

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

    def fit(self, probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Fit on held-out probabilities (N, K, C); returns params worth logging (branches named by `names`)."""
        return {}


def learn_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log-loss of sum_k w_k probs[:, k]."""
    n_branches = probs.shape[1]
    p_true = np.clip(probs[np.arange(len(labels)), :, labels], 1e-12, 1.0)  # (N, K)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        mix = np.clip(p_true @ w, 1e-12, None)
        return float(-np.log(mix).mean()), -(p_true / mix[:, None]).mean(axis=0)

    start = np.full(n_branches, 1.0 / n_branches)
    result = minimize(
        loss,
        start,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n_branches,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-12, "maxiter": 500},  # log-loss differences near the optimum are ~1e-6
    )
    w = np.clip(result.x, 0.0, None)
    return w / w.sum() if w.sum() > 0 else start


class AverageFusion(Fusion):
    """Mean of branch probabilities, optionally weighted (weights are normalised to sum to 1).

    weights="learned" fits the weights on held-out probabilities (`fit`) by minimising log-loss.
    """

    name = "average"

    def __init__(self, n_branches: int, num_classes: int, weights: Sequence[float] | str | None = None):
        super().__init__(n_branches, num_classes)
        if isinstance(weights, str):
            if weights != "learned":
                raise ConfigError(
                    f"fusion.weights={weights!r} is unknown; use fusion.weights=learned, a list such as "
                    "fusion.weights=[2,1], or null"
                )
            self.needs_fit = True
            weights = None
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

    def fit(self, probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, Any]:
        if not self.needs_fit:
            return {}
        w = learn_weights(probs.double().cpu().numpy(), labels.cpu().numpy())
        self.weights.copy_(torch.from_numpy(w))
        names = list(names) if names is not None else [str(i) for i in range(self.n_branches)]
        return {f"average/weight_{n}": round(float(v), 6) for n, v in zip(names, w, strict=True)}


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
    """A meta-learner (logreg, hgb or mlp) over branch probabilities, kept as JSON in the state dict.

    The fitted meta-learner travels as `_extra_state` (a JSON string), never as a pickled estimator.
    Until fitted it returns the mean of branch probabilities.
    """

    name = "stacking"
    needs_fit = True

    def __init__(self, n_branches: int, num_classes: int, C: float = 1.0, meta: str = "logreg", seed: int = 0):
        super().__init__(n_branches, num_classes)
        self.C = float(C)
        self.meta = meta_mod.check_meta(meta)
        self.seed = int(seed)
        self.spec: dict[str, Any] | None = None

    @property
    def fitted(self) -> bool:
        return self.spec is not None

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        if self.spec is None:
            return probs.mean(dim=1), None
        return meta_mod.predict_proba(self.spec, meta_features(probs), self.num_classes), None

    def fit(self, probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, Any]:
        x = meta_features(probs.double()).cpu().numpy()
        self.spec = meta_mod.fit_meta(self.meta, x, labels.cpu().numpy(), C=self.C, seed=self.seed)
        return meta_mod.summary_params(self.spec)

    def get_extra_state(self) -> dict[str, str]:
        return {"meta": json.dumps(self.spec) if self.spec is not None else ""}

    def set_extra_state(self, state: Mapping[str, str]) -> None:
        text = state.get("meta", "") if state else ""
        self.spec = json.loads(text) if text else None


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
        if weights is not None and not isinstance(weights, str):
            weights = list(weights)
        return AverageFusion(n_branches, num_classes, weights)
    if name == "voting":
        return VotingFusion(n_branches, num_classes, bool(cfg.get("soft", False)))
    return StackingFusion(
        n_branches, num_classes, float(cfg.get("C", 1.0)), str(cfg.get("meta", "logreg")), int(cfg.get("seed", 0))
    )
