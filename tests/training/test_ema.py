"""model.ema: the exponential moving average of the weights is what is validated, checkpointed and restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger

from tests.conftest import SMALL_SYNTHETIC, compose_config
from xrayfusion.core.errors import ConfigError
from xrayfusion.data import XRayDataModule
from xrayfusion.training.callbacks import ExponentialMovingAverage, ema_settings
from xrayfusion.training.checkpoints import load_checkpoint
from xrayfusion.training.factory import build_model, build_trainer, restore_best

DECAY = 0.5


class RawWeights(pl.Callback):
    """The model's float weights after every optimizer step (before any averaging swaps them)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = pl_module.state_dict()
        self.steps.append({k: v.detach().clone() for k, v in state.items() if v.is_floating_point()})


def expected_ema(steps: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor] | None = None):
    average = dict(start) if start is not None else None
    for raw in steps:
        average = dict(raw) if average is None else {k: DECAY * average[k] + (1 - DECAY) * raw[k] for k in raw}
    return average


def fit(tmp_path: Path, epochs: int, resume: Path | None = None):
    cfg = compose_config(
        "train",
        [
            *SMALL_SYNTHETIC,
            "model=single",
            "model.branches=[small_cnn]",
            "model.ema.enabled=true",
            f"model.ema.decay={DECAY}",
            "model.ema.warmup=false",
            f"trainer.max_epochs={epochs}",
            "data.augment.enabled=false",
            "scheduler=none",  # a one-cycle schedule cannot be resumed into more epochs
        ],
    )
    pl.seed_everything(0)
    dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    dm.prepare()
    model = build_model(cfg, dm)
    logger = CSVLogger(tmp_path / "logs")
    parts = build_trainer(cfg, model, logger, tmp_path / "ckpt", tmp_path, enable_model_summary=False)
    raw = RawWeights()
    parts.trainer.callbacks.append(raw)
    assert any(isinstance(c, ExponentialMovingAverage) for c in parts.trainer.callbacks)
    parts.trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True)
    return model, parts, raw


def floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_ema_is_checkpointed_restored_and_resumed(tmp_path: Path) -> None:
    model, parts, raw = fit(tmp_path, epochs=1)
    steps = len(raw.steps)
    assert steps == 4  # 64 training images, batches of 16
    best = load_checkpoint(parts.checkpoint.best_model_path)
    # the checkpoint's weights are the EMA of the raw weights of every step; the raw ones travel beside them
    assert_states_equal(floats(best["state_dict"]), expected_ema(raw.steps))
    assert_states_equal(floats(best["current_model_state"]), raw.steps[-1])
    assert not torch.allclose(best["state_dict"]["heads.small_cnn.weight"], raw.steps[-1]["heads.small_cnn.weight"])
    model.load_state_dict(raw.steps[-1], strict=False)  # whatever the model holds, restore_best loads the EMA
    assert restore_best(model, parts.checkpoint)
    assert_states_equal(floats(model.state_dict()), expected_ema(raw.steps))

    # resume from last.ckpt: the raw weights continue training and the average continues from the saved one
    last = tmp_path / "ckpt" / "last.ckpt"
    first_average = floats(load_checkpoint(last)["state_dict"])
    _, parts2, raw2 = fit(tmp_path / "resumed", epochs=2, resume=last)
    assert len(raw2.steps) == steps  # only the second epoch ran
    resumed = load_checkpoint(tmp_path / "resumed" / "ckpt" / "last.ckpt")
    assert int(resumed["averaging_state"]["n_averaged"]) == 2 * steps
    assert_states_equal(floats(resumed["state_dict"]), expected_ema(raw2.steps, first_average))


def test_ema_settings_and_warmup() -> None:
    assert ema_settings(None)["enabled"] is False
    with pytest.raises(ConfigError, match="model.ema.decay=1.5"):
        ema_settings({"decay": 1.5})
    with pytest.raises(ConfigError, match="model.ema.decy is not a key"):
        ema_settings({"decy": 0.9})
    ema = ExponentialMovingAverage(decay=0.999, warmup=True)
    assert ema.decay_at(1) == pytest.approx(1 - 2**-0.75) and ema.decay_at(10**6) == 0.999
    assert ExponentialMovingAverage(decay=0.9, warmup=False).decay_at(1) == 0.9
