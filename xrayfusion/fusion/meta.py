"""Stacking meta-learners (logreg, hgb, mlp): fitted with scikit-learn, stored as JSON, evaluated in torch.

A fitted meta-learner is a plain JSON-able `spec` (coefficients, network weights or the nodes of every
boosted tree), so checkpoints never hold pickled estimators and predictions need no scikit-learn.
`raw_scores(spec, x)` reproduces the estimator's decision values; `predict_proba(spec, x, C)` its
probabilities over all `C` classes (classes absent from the fit get probability 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from xrayfusion.core.errors import ConfigError

META_LEARNERS = ("logreg", "hgb", "mlp")
# the hgb export reads HistGradientBoostingClassifier's private `_predictors` and `_baseline_prediction`;
# it is tested against these scikit-learn versions (tests/fusion/test_meta.py), and pyproject.toml pins them
HGB_SKLEARN_TESTED = ((1, 4), (1, 10))  # >= 1.4, < 1.10


def _sklearn_version() -> tuple[int, int]:
    import sklearn

    major, minor = sklearn.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_hgb_export(version: tuple[int, int] | None = None) -> None:
    """ConfigError when this scikit-learn is outside the versions the hgb export is tested against."""
    version = version or _sklearn_version()
    low, high = HGB_SKLEARN_TESTED
    if not low <= version < high:
        raise ConfigError(
            f"fusion.meta=hgb is exported from scikit-learn internals tested with versions >= {low[0]}.{low[1]} and "
            f"< {high[0]}.{high[1]}; this environment has {version[0]}.{version[1]}. Install a tested version "
            "(pip install 'scikit-learn>=1.4,<1.10') or use fusion.meta=logreg or fusion.meta=mlp"
        )


def check_meta(kind: str) -> str:
    if kind not in META_LEARNERS:
        raise ConfigError(f"fusion.meta={kind!r} is unknown; choose one of {list(META_LEARNERS)}")
    return kind


def _tree_spec(nodes: np.ndarray) -> dict[str, list]:
    return {
        "feature": nodes["feature_idx"].astype(int).tolist(),
        "threshold": nodes["num_threshold"].astype(float).tolist(),
        "missing_left": nodes["missing_go_to_left"].astype(bool).tolist(),
        "left": nodes["left"].astype(int).tolist(),
        "right": nodes["right"].astype(int).tolist(),
        "leaf": nodes["is_leaf"].astype(bool).tolist(),
        "value": nodes["value"].astype(float).tolist(),
        "depth": int(nodes["depth"].max()),
    }


def make_estimator(kind: str, C: float = 1.0, seed: int = 0) -> Any:
    """The unfitted scikit-learn estimator behind a meta-learner name."""
    check_meta(kind)
    if kind == "logreg":
        return LogisticRegression(C=C, max_iter=1000)
    if kind == "mlp":
        return MLPClassifier(hidden_layer_sizes=(16,), alpha=1e-3, max_iter=2000, random_state=seed)
    return HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.1, random_state=seed)


def to_spec(kind: str, est: Any) -> dict[str, Any]:
    """The JSON-able spec of a fitted estimator made by `make_estimator(kind)`."""
    spec: dict[str, Any] = {"kind": check_meta(kind), "classes": [int(c) for c in est.classes_]}
    if kind == "logreg":
        spec.update(coef=est.coef_.tolist(), intercept=est.intercept_.tolist())
    elif kind == "mlp":
        spec.update(
            activation=est.activation,
            weights=[w.tolist() for w in est.coefs_],
            biases=[b.tolist() for b in est.intercepts_],
        )
    else:
        check_hgb_export()
        n_out = est.n_trees_per_iteration_
        trees, outputs = [], []
        for iteration in est._predictors:  # the fitted trees; their node arrays are all prediction uses
            for out, predictor in enumerate(iteration):
                trees.append(_tree_spec(predictor.nodes))
                outputs.append(out)
        spec.update(
            baseline=np.asarray(est._baseline_prediction, dtype=float).reshape(-1)[:n_out].tolist(),
            trees=trees,
            tree_output=outputs,
        )
    return spec


def fit_meta(kind: str, x: np.ndarray, y: np.ndarray, C: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fit a `kind` meta-learner on features x (N, F) and labels y (N,); returns its JSON-able spec."""
    check_meta(kind)
    if len(np.unique(y)) < 2:
        raise ConfigError("stacking needs held-out predictions of at least two classes to fit the meta-learner")
    with threadpool_limits(1):  # a few thousand rows: threads only add overhead (HGB is 50x slower when oversubscribed)
        return to_spec(kind, make_estimator(kind, C, seed).fit(x, y))


_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "logistic": torch.sigmoid, "identity": lambda v: v}


def _hgb_scores(spec: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    trees = spec["trees"]
    n_nodes = max(len(t["value"]) for t in trees)

    def pad(field: str, fill: float | int | bool, dtype: torch.dtype) -> torch.Tensor:
        rows = [t[field] + [fill] * (n_nodes - len(t[field])) for t in trees]
        return torch.tensor(rows, dtype=dtype, device=x.device)

    feature, left, right = pad("feature", 0, torch.long), pad("left", 0, torch.long), pad("right", 0, torch.long)
    threshold, value = pad("threshold", 0.0, x.dtype), pad("value", 0.0, x.dtype)
    leaf, missing_left = pad("leaf", True, torch.bool), pad("missing_left", False, torch.bool)
    n_trees = len(trees)
    node = torch.zeros(x.shape[0], n_trees, dtype=torch.long, device=x.device)
    tree_idx = torch.arange(n_trees, device=x.device).expand_as(node)
    for _ in range(max(t["depth"] for t in trees)):
        f = feature[tree_idx, node]
        xv = x.gather(1, f)
        missing = torch.isnan(xv)  # boolean algebra instead of where() on booleans: it exports to ONNX
        go_left = (missing & missing_left[tree_idx, node]) | (~missing & (xv <= threshold[tree_idx, node]))
        nxt = torch.where(go_left, left[tree_idx, node], right[tree_idx, node])
        node = torch.where(leaf[tree_idx, node], node, nxt)
    values = value[tree_idx, node]  # (N, T)
    baseline = torch.tensor(spec["baseline"], dtype=x.dtype, device=x.device)
    onehot = torch.nn.functional.one_hot(torch.tensor(spec["tree_output"], device=x.device), len(baseline))
    return baseline + values @ onehot.to(x.dtype)


def raw_scores(spec: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """Decision values (N, 1) for two present classes, else (N, n_present): sklearn's decision_function."""
    kind = spec["kind"]
    if kind == "logreg":
        coef = torch.tensor(spec["coef"], dtype=x.dtype, device=x.device)
        return x @ coef.T + torch.tensor(spec["intercept"], dtype=x.dtype, device=x.device)
    if kind == "mlp":
        h = x
        layers = list(zip(spec["weights"], spec["biases"], strict=True))
        for i, (w, b) in enumerate(layers):
            h = h @ torch.tensor(w, dtype=x.dtype, device=x.device) + torch.tensor(b, dtype=x.dtype, device=x.device)
            if i < len(layers) - 1:
                h = _ACTIVATIONS[spec["activation"]](h)
        return h
    if kind == "hgb":
        return _hgb_scores(spec, x)
    raise ConfigError(f"unknown meta-learner kind {kind!r} in a checkpoint; expected one of {list(META_LEARNERS)}")


def predict_proba(spec: dict[str, Any], x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Probabilities (N, num_classes) of a fitted spec; classes it never saw get 0."""
    z = raw_scores(spec, x)
    if z.shape[1] == 1:
        p1 = torch.sigmoid(z[:, 0])
        present = torch.stack([1 - p1, p1], dim=1)
    else:
        present = z.softmax(dim=1)
    out = torch.zeros(x.shape[0], num_classes, dtype=x.dtype, device=x.device)
    out[:, spec["classes"]] = present
    return out


def summary_params(spec: dict[str, Any], prefix: str = "stacking") -> dict[str, Any]:
    """What is worth logging as MLflow params: coefficients (logreg) or size of the fitted model."""
    params: dict[str, Any] = {f"{prefix}/meta": spec["kind"]}
    if spec["kind"] == "logreg":
        flat = np.asarray(spec["coef"], dtype=float).reshape(-1)
        params.update({f"{prefix}/coef_{i}": float(v) for i, v in enumerate(flat)})
        params.update({f"{prefix}/intercept_{i}": float(v) for i, v in enumerate(spec["intercept"])})
    elif spec["kind"] == "mlp":
        params[f"{prefix}/mlp_layers"] = str([len(b) for b in spec["biases"]])
    else:
        params[f"{prefix}/hgb_trees"] = len(spec["trees"])
        params[f"{prefix}/hgb_leaves"] = sum(sum(t["leaf"]) for t in spec["trees"])
    return params
