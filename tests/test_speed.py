"""Speed switches: workers, threads, compile flag, and no host syncs in the training step."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy

from xrayfusion.errors import ConfigError
from xrayfusion.metrics import train_accuracy
from xrayfusion.models import FusionClassifier
from xrayfusion.runtime import configure_torch, resolve_workers


def test_resolve_workers() -> None:
    assert resolve_workers(3) == 3
    assert resolve_workers("2") == 2
    assert resolve_workers("auto") >= 0
    with pytest.raises(ConfigError, match="num_workers=-1"):
        resolve_workers(-1)
    with pytest.raises(ConfigError, match="'many'"):
        resolve_workers("many")


def test_configure_torch_sets_and_rejects() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_torch(threads=1)["threads"] == 1
        with pytest.raises(ConfigError, match="runtime.threads=0"):
            configure_torch(threads=0)
        with pytest.raises(ConfigError, match="fastest"):
            configure_torch(matmul_precision="fastest")
    finally:
        torch.set_num_threads(before)


def test_train_accuracy_matches_torchmetrics() -> None:
    probs1 = torch.rand(50)
    probs = torch.stack([1 - probs1, probs1], dim=1)
    target = torch.randint(0, 2, (50,))
    ours, ref = train_accuracy(2, threshold=0.3), BinaryAccuracy(threshold=0.3)
    ours.update(probs[:20], target[:20])
    ours.update(probs[20:], target[20:])
    ref.update(probs1, target)
    assert torch.isclose(ours.compute(), ref.compute())


def _model(branches: tuple[str, ...] = ("small_cnn", "resnet18"), **kw) -> FusionClassifier:
    # SGD: AdamW on CPU reads its step counters with .item() (host tensors, not device syncs)
    return FusionClassifier(
        list(branches),
        num_classes=2,
        fusion={"name": "average"},
        image_size=32,
        optimizer=functools.partial(torch.optim.SGD, lr=1e-2),
        **kw,
    )


def test_compile_keeps_checkpoint_keys() -> None:
    assert list(_model(compile=True).state_dict()) == list(_model().state_dict())


def _host_syncs(steps: int) -> int:
    """Count tensor-to-host reads (`.item()` and friends) during a fit of `steps` training steps."""
    pl.seed_everything(0)
    x = torch.randint(0, 255, (8 * steps, 1, 32, 32), dtype=torch.uint8)
    y = torch.arange(8 * steps) % 2
    loader = DataLoader(list(zip(x, y, strict=True)), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
    )
    model = _model(("small_cnn",))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit(model, train_dataloaders=loader)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def test_training_step_has_no_per_step_host_sync() -> None:
    assert _host_syncs(2) == _host_syncs(6)
