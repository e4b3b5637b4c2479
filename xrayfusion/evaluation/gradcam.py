"""Grad-CAM heat maps per branch (pytorch-grad-cam), laid out as one PNG grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xrayfusion.core.modes import eval_mode
from xrayfusion.core.names import predict_labels
from xrayfusion.evaluation.plots import plt
from xrayfusion.models import FusionClassifier


class BranchClassifier(nn.Module):
    """One branch as a plain classifier (uint8 or float images -> logits) for CAM libraries."""

    def __init__(self, model: FusionClassifier, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.heads[self.key](self.model.backbones[self.key](self.model.preprocess(x)))


def last_conv_layer(module: nn.Module) -> nn.Module:
    """The last Conv2d of a backbone: the usual Grad-CAM target of a CNN."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(module).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def select_examples(labels: torch.Tensor, predicted: torch.Tensor, n: int) -> list[int]:
    """Up to `n` indices covering each class, right and wrong, taken in turn from each group."""
    groups = [
        [i for i in range(len(labels)) if int(labels[i]) == c and (int(predicted[i]) == c) == right]
        for c in sorted(set(labels.tolist()))
        for right in (True, False)
    ]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n and any(depth < len(g) for g in groups):
        chosen += [g[depth] for g in groups if depth < len(g)][: n - len(chosen)]
        depth += 1
    return chosen


def branch_cams(model: FusionClassifier, images: torch.Tensor, targets: Sequence[int]) -> dict[str, np.ndarray]:
    """Grad-CAM maps (N, H, W) in [0, 1] of every branch for the given target classes."""
    cams = {}
    # an input that needs grad makes every activation need it, so frozen backbones still get a CAM
    # as [0, 1] floats, what the model's preprocessing takes besides uint8 (a float 0-255 image would be read as
    # 255 times too bright, and equalisation refuses values outside [0, 1])
    x = images.to(model.device)
    x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).requires_grad_(True)
    with eval_mode(model, no_grad=False), torch.enable_grad():
        try:
            for key in model.keys:
                wrapper = BranchClassifier(model, key)
                with GradCAM(model=wrapper, target_layers=[last_conv_layer(model.backbones[key])]) as cam:
                    cams[key] = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        finally:
            model.zero_grad(set_to_none=True)  # the CAM backward pass must leave no gradients behind
    return cams


def gradcam_figure(
    model: FusionClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    fused_probs: torch.Tensor,
    n_images: int = 8,
) -> Figure:
    """Grid: one row per chosen test image (both classes, right and wrong), the image then each branch's map.

    Maps explain the class the fused model predicted.
    """
    class_names = list(model.hparams.class_names)
    predicted = predict_labels(fused_probs, float(model.hparams.threshold))
    idx = select_examples(labels, predicted, n_images)
    if not idx:
        raise ValueError("no test images to explain")
    chosen = images[idx]
    cams = branch_cams(model, chosen, [int(predicted[i]) for i in idx])
    cols = 1 + len(model.keys)
    fig, axes = plt.subplots(len(idx), cols, figsize=(2.2 * cols, 2.3 * len(idx)), squeeze=False)
    for row, i in enumerate(idx):
        grey = chosen[row, 0].float().numpy() / 255.0
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        truth, guess = class_names[int(labels[i])], class_names[int(predicted[i])]
        mark = "right" if truth == guess else "WRONG"
        axes[row, 0].imshow(grey, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_title(f"true {truth}\nfused: {guess} ({mark})", fontsize=7)
        for col, key in enumerate(model.keys, start=1):
            axes[row, col].imshow(show_cam_on_image(rgb, cams[key][row], use_rgb=True))
            if row == 0:
                axes[row, col].set_title(key, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("Grad-CAM per branch (target: fused prediction)", fontsize=9)
    fig.tight_layout()
    return fig
