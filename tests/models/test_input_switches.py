"""model.equalize (histogram equalisation / CLAHE in the preprocessing) and model.mixup (soft training targets)."""

from __future__ import annotations

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xrayfusion.core.errors import ConfigError
from xrayfusion.models import FusionClassifier
from xrayfusion.models.mixup import BatchMixer, build_mixer, mixup_settings


def images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["hist", "clahe"])
def test_equalised_preprocessing_is_kornias(mode: str) -> None:
    model = FusionClassifier(
        ["small_cnn"], 2, {"name": "average"}, image_size=32, equalize=mode, clahe_clip_limit=2.0, clahe_grid=[4, 2]
    )
    x = images()
    expected = (
        kornia.enhance.equalize(x.float() / 255)
        if mode == "hist"
        else kornia.enhance.equalize_clahe(x.float() / 255, clip_limit=2.0, grid_size=(4, 2))
    )
    torch.testing.assert_close(model.preprocess(x), (expected - 0.5) / 0.25)
    plain = FusionClassifier(["small_cnn"], 2, {"name": "average"}, image_size=32)
    assert not torch.allclose(model.preprocess(x), plain.preprocess(x))  # it does change the input
    assert model.hparams.equalize == mode and model.hparams.clahe_grid == [4, 2]  # saved with the checkpoint


def test_equalize_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="model.equalize='clahe2'"):
        FusionClassifier(["small_cnn"], 2, {"name": "average"}, image_size=32, equalize="clahe2")
    with pytest.raises(ConfigError, match=r"model.clahe.grid=\[8, 40\] needs images larger than 40 px"):
        FusionClassifier(["small_cnn"], 2, {"name": "average"}, image_size=32, equalize="clahe", clahe_grid=[8, 40])


def tiny(fusion: str = "concat", class_weights=None, **mixup) -> FusionClassifier:
    torch.manual_seed(0)
    return FusionClassifier(
        ["small_cnn", "darknet"], 2, {"name": fusion}, image_size=32, class_weights=class_weights, mixup=mixup
    )


def test_loss_takes_soft_targets_and_one_hot_ones_equal_hard_labels() -> None:
    model = tiny(class_weights=[1.0, 3.0])  # concat: branch losses plus the fused head's loss
    out = model(images(4))
    y = torch.tensor([0, 1, 1, 0])
    one_hot = F.one_hot(y, 2).float()
    torch.testing.assert_close(model._loss(out, one_hot), model._loss(out, y))
    # a mixed target: the loss is the lam-weighted mix of the two hard-label losses, class weights included
    lam = 0.7
    soft = lam * one_hot + (1 - lam) * one_hot.flip(0)
    w = torch.tensor([1.0, 3.0])
    logp, fused_logp = out["logits"].log_softmax(2), out["fused_logits"].log_softmax(1)
    branch = -(soft[:, None, :] * w * logp).sum() / 4
    fused = -(soft * w * fused_logp).sum() / (soft * w).sum()
    torch.testing.assert_close(model._loss(out, soft), branch + fused)


def test_label_smoothing_alone_leaves_images_and_smooths_targets() -> None:
    model = tiny("average", label_smoothing=0.2)
    x, y = images(4), torch.tensor([0, 1, 1, 0])
    mixed, target = model.mixer(x, y)
    assert mixed is x  # no mixing: the uint8 batch goes on untouched
    torch.testing.assert_close(target, torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]))
    out = model(x)
    expected = sum(F.cross_entropy(out["logits"][:, i], y, label_smoothing=0.2) for i in range(2))
    torch.testing.assert_close(model._loss(out, target), expected)


def test_mixup_mixes_image_pairs_and_targets_alike_odd_batches_too() -> None:
    mixer = BatchMixer(2, mixup_settings({"mixup_alpha": 0.4}))
    x, y = images(5), torch.tensor([0, 0, 1, 1, 1])
    np.random.seed(3)
    mixed, target = mixer(x, y)
    np.random.seed(3)
    np.random.rand()  # timm draws whether to mix this batch, then the weight
    lam = float(np.random.beta(0.4, 0.4))
    base, hard = x.float() / 255, F.one_hot(y, 2).float()
    torch.testing.assert_close(mixed[:4], lam * base[:4] + (1 - lam) * base[:4].flip(0))  # pairs (i, 3 - i)
    torch.testing.assert_close(target[:4], lam * hard[:4] + (1 - lam) * hard[:4].flip(0))
    torch.testing.assert_close(mixed[4], base[4])  # the odd one out is not mixed
    torch.testing.assert_close(target[4], hard[4])
    assert 0 < lam < 1 and mixed.dtype == torch.float32


def test_training_step_trains_on_soft_targets_and_scores_hard_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny("average", mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
    seen, loss_of = {}, model._loss

    def recording_loss(out, target):
        seen["target"] = target
        return loss_of(out, target)

    monkeypatch.setattr(model, "_loss", recording_loss)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    y = torch.tensor([0, 1, 1, 0])
    loss = model.training_step((images(4), y), 0)
    assert torch.isfinite(loss) and seen["target"].shape == (4, 2) and seen["target"].is_floating_point()
    assert int(model.train_acc.total) == 4  # train accuracy counts the hard labels
    assert build_mixer({}, 2) is None and build_mixer({"label_smoothing": 0.1}, 2) is not None
    with pytest.raises(ConfigError, match="model.mixup.prob=1.5"):
        mixup_settings({"prob": 1.5})
    with pytest.raises(ConfigError, match="model.mixup.alpha is not a key"):
        mixup_settings({"alpha": 1.0})
