"""Grad-CAM: example choice covers both classes right and wrong; maps come from pytorch-grad-cam per branch."""

from __future__ import annotations

import torch

from tests.evaluation.test_evaluation import tiny_model
from xrayfusion.evaluation import gradcam


def test_select_examples_takes_each_class_right_and_wrong() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    predicted = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    chosen = gradcam.select_examples(labels, predicted, 4)
    assert sorted(chosen) == [0, 2, 3, 5]
    assert gradcam.select_examples(labels, predicted, 100) == [0, 2, 3, 5, 1, 4, 6]


def test_branch_cams_and_grid() -> None:
    model = tiny_model("average")
    images = torch.randint(0, 255, (6, 1, 32, 32), dtype=torch.uint8)
    cams = gradcam.branch_cams(model, images[:3], [0, 1, 1])
    assert set(cams) == {"small_cnn", "darknet"}
    for cam in cams.values():
        assert cam.shape == (3, 32, 32) and cam.min() >= 0 and cam.max() <= 1
    assert not model.training and all(p.grad is None for p in model.parameters())
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    fused = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.8, 0.2], [0.1, 0.9]])
    fig = gradcam.gradcam_figure(model, images, labels, fused, n_images=4)
    assert len(fig.axes) == 4 * 3
    titles = [ax.get_title() for ax in fig.axes]
    assert any("WRONG" in t for t in titles) and any("(right)" in t for t in titles)
