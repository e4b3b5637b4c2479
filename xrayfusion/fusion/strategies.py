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

from xrayfusion.core.errors import ConfigError, did_you_mean
from xrayfusion.fusion import meta as meta_mod

FusionOutput = tuple[torch.Tensor, torch.Tensor | None]


FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(cls: type[Fusion]) -> type[Fusion]:
    """Class decorator: make strategy `cls` available as `fusion.name=<cls.name>` (plus a conf/fusion/*.yaml)."""
    if cls.name in FUSIONS:
        raise ValueError(f"fusion {cls.name!r} is registered twice")
    FUSIONS[cls.name] = cls
    return cls


class Fusion(nn.Module):
    """Base strategy. `needs_fit` strategies are fitted on held-out branch probabilities after training.

    A subclass sets `name` (its `fusion.name`), `min_branches`, and builds itself from its config in
    `from_config`.
    """

    name = "base"
    needs_fit = False
    # whether the fused output is computed from the branch probabilities (so branch temperatures change it)
    uses_probs = True
    min_branches = 1

    def __init__(self, n_branches: int, num_classes: int):
        super().__init__()
        self.n_branches = n_branches
        self.num_classes = num_classes

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], n_branches: int, num_classes: int, feature_dims: Sequence[int]
    ) -> Fusion:
        """The strategy for the fusion config `cfg` (the keys of its conf/fusion/<name>.yaml)."""
        return cls(n_branches, num_classes)

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


@register_fusion
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

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], n_branches: int, num_classes: int, feature_dims: Sequence[int]
    ) -> Fusion:
        weights = cfg.get("weights")
        if weights is not None and not isinstance(weights, str):
            weights = list(weights)
        return cls(n_branches, num_classes, weights)

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        return torch.einsum("bkc,k->bc", probs, self.weights.to(probs.dtype)), None

    def fit(self, probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, Any]:
        if not self.needs_fit:
            return {}
        w = learn_weights(probs.double().cpu().numpy(), labels.cpu().numpy())
        self.weights.copy_(torch.from_numpy(w))
        return self.weight_params(names)

    def weight_params(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """The weights as MLflow params, `average/weight_<branch>`."""
        names = list(names) if names is not None else [str(i) for i in range(self.n_branches)]
        return {f"average/weight_{n}": round(float(v), 6) for n, v in zip(names, self.weights, strict=True)}


@register_fusion
class VotingFusion(Fusion):
    """Hard majority vote: fused probability = vote share, ties broken by mean probability. soft=True averages."""

    name = "voting"
    min_branches = 2

    def __init__(self, n_branches: int, num_classes: int, soft: bool = False):
        super().__init__(n_branches, num_classes)
        self.soft = soft

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], n_branches: int, num_classes: int, feature_dims: Sequence[int]
    ) -> Fusion:
        return cls(n_branches, num_classes, bool(cfg.get("soft", False)))

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        mean = probs.mean(dim=1)
        if self.soft:
            return mean, None
        votes = nn.functional.one_hot(probs.argmax(dim=2), self.num_classes).sum(dim=1).to(probs.dtype)
        # votes dominate; the mean probability (< 1 vote at weight 0.5) only orders tied classes
        return (votes + 0.5 * mean) / (self.n_branches + 0.5), None


@register_fusion
class ConcatFusion(Fusion):
    """Branch features concatenated, dropout, and a linear head trained end to end with the branches."""

    name = "concat"
    uses_probs = False  # a head over the branch features

    def __init__(self, n_branches: int, num_classes: int, feature_dims: Sequence[int], dropout: float = 0.2):
        super().__init__(n_branches, num_classes)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(int(sum(feature_dims)), num_classes)

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], n_branches: int, num_classes: int, feature_dims: Sequence[int]
    ) -> Fusion:
        return cls(n_branches, num_classes, feature_dims, float(cfg.get("dropout", 0.2)))

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        logits = self.head(self.drop(torch.cat(list(features), dim=1)))
        return logits.softmax(dim=1), logits


def meta_features(probs: torch.Tensor) -> torch.Tensor:
    """Meta-learner inputs: the positive-class probability per branch (binary) or all class probabilities."""
    if probs.shape[2] == 2:
        return probs[:, :, 1]
    return probs.flatten(1)


@register_fusion
class StackingFusion(Fusion):
    """A meta-learner (logreg, hgb or mlp) over branch probabilities, kept as JSON in the state dict.

    The fitted meta-learner travels as `_extra_state` (a JSON string), never as a pickled estimator.
    Until fitted it returns the mean of branch probabilities.
    """

    name = "stacking"
    needs_fit = True
    min_branches = 2

    def __init__(self, n_branches: int, num_classes: int, C: float = 1.0, meta: str = "logreg", seed: int = 0):
        super().__init__(n_branches, num_classes)
        self.C = float(C)
        self.meta = meta_mod.check_meta(meta)
        self.seed = int(seed)
        self.spec: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], n_branches: int, num_classes: int, feature_dims: Sequence[int]
    ) -> Fusion:
        return cls(
            n_branches, num_classes, float(cfg.get("C", 1.0)), str(cfg.get("meta", "logreg")), int(cfg.get("seed", 0))
        )

    @property
    def fitted(self) -> bool:
        return self.spec is not None

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor]) -> FusionOutput:
        if self.spec is None:
            return probs.mean(dim=1), None
        # float64, as the meta-learner was fitted: float32 rounds split thresholds such as 0.99999997 to 1.0
        fused = meta_mod.predict_proba(self.spec, meta_features(probs.double()), self.num_classes)
        return fused.to(probs.dtype), None

    def fit(self, probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, Any]:
        x = meta_features(probs.double()).cpu().numpy()
        self.spec = meta_mod.fit_meta(self.meta, x, labels.cpu().numpy(), C=self.C, seed=self.seed)
        return meta_mod.summary_params(self.spec)

    def get_extra_state(self) -> dict[str, str]:
        return {"meta": json.dumps(self.spec) if self.spec is not None else ""}

    def set_extra_state(self, state: Mapping[str, str]) -> None:
        text = state.get("meta", "") if state else ""
        self.spec = json.loads(text) if text else None


def check_fusion(name: Any, n_branches: int | None = None) -> type[Fusion]:
    """The registered strategy class of `name`; ConfigError for an unknown name or too few branches."""
    if name not in FUSIONS:
        raise ConfigError(
            f"unknown fusion {name!r}{did_you_mean(str(name), FUSIONS)}; choose fusion= one of {list(FUSIONS)}"
        )
    cls = FUSIONS[name]
    if n_branches is not None and n_branches < cls.min_branches:
        raise ConfigError(
            f"fusion={name} needs at least {cls.min_branches} branches but model.branches has {n_branches}; "
            "add a branch or use fusion=average"
        )
    return cls


def build_fusion(cfg: Mapping[str, Any], n_branches: int, num_classes: int, feature_dims: Sequence[int]) -> Fusion:
    """The strategy named by cfg['name'] for `n_branches` branches."""
    cls = check_fusion(cfg.get("name"), n_branches)
    return cls.from_config(cfg, n_branches, num_classes, feature_dims)
