"""Callbacks tests add through `callbacks.extra` for deterministic faults."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL the training process when it reaches global step `step`: a crash at a known point, no sleeps."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
