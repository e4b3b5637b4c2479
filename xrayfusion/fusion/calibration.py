"""Temperature scaling: one temperature per branch fitted on validation logits (Guo et al., 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 minimising the cross-entropy of softmax(logits / T) on held-out (N, C) logits."""
    logits = logits.detach().double()
    labels = labels.detach().long()
    log_t = torch.zeros((), dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(1e-2, 1e2))


def fit_temperatures(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One temperature per branch for (N, K, C) logits."""
    return torch.tensor([fit_temperature(logits[:, k], labels) for k in range(logits.shape[1])])


def view_probs(view_logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """Branch probabilities (N, V, K, C) of raw logits (N, V, K, C) of V test-time views under per-branch
    temperatures (K,), as the model computes them per view: softmax(logits / T) in float32. The model's branch
    probabilities are their mean over views (`.mean(dim=1)`)."""
    return (view_logits.float() / temps.float().view(1, 1, -1, 1)).softmax(dim=3)


def temperature_params(keys: list[str], temps: torch.Tensor) -> dict[str, float]:
    """MLflow params naming each branch's temperature."""
    return {f"calibration/temperature_{k}": round(float(t), 6) for k, t in zip(keys, temps.tolist(), strict=True)}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of (N, C) probabilities (positive-class confidence for two classes), as torchmetrics computes it."""
    if probs.shape[1] == 2:
        return float(binary_calibration_error(probs[:, 1].float().contiguous(), labels, n_bins=n_bins))
    return float(multiclass_calibration_error(probs.float(), labels, num_classes=probs.shape[1], n_bins=n_bins))
