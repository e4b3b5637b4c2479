"""Lightning callbacks of the project: the epoch history for plots and the non-finite-loss guard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from xrayfusion.core.errors import XrayfusionError


class EpochHistory(pl.Callback):
    """Keeps every epoch's logged values (train and validation) for the training-curves plot."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        values["epoch"] = float(trainer.current_epoch)
        self.history.append(values)


class NonFiniteLossError(XrayfusionError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(pl.Callback):
    """Stops training before the backward pass of a NaN/inf loss (on any process), naming the step."""

    def __init__(self) -> None:
        self.batch_idx = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self.batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            return
        ckpt = getattr(trainer.checkpoint_callback, "dirpath", None)
        kept = f"the last good checkpoint is {Path(ckpt) / 'last.ckpt'}" if ckpt else "no checkpoint was written"
        raise NonFiniteLossError(
            f"training loss became {value} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {self.batch_idx}); training stopped and {kept}. Lower optimizer.lr, set "
            "trainer.gradient_clip_val=1.0 or check the data"
        )
