"""Lightning callbacks of the project: the epoch history for plots and the non-finite-loss guard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from xrayfusion.core.errors import XrayfusionError


class EpochHistory(pl.Callback):
    """Keeps every epoch's logged values (train and validation) for the training-curves plot, and logs each
    epoch's wall time (its training and validation) as `time/epoch_seconds`."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._started
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        values["epoch"] = float(trainer.current_epoch)
        self.history.append(values)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"time/epoch_seconds": seconds}, step=trainer.current_epoch)


class NonFiniteLossError(XrayfusionError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(pl.Callback):
    """Stops training on a NaN/inf loss (on any process), naming the step; never lets one reach a checkpoint.

    Each step only records, on the loss's device, whether the loss was finite (no host sync, no collective).
    The record is read back (and, under DDP, reduced across processes) every `every_n_steps` steps and
    before every checkpoint is written. With `every_n_steps=1` training stops before the backward pass of
    the first bad loss; with N, at most N-1 more steps run (on weights the next check then refuses to save).
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = int(every_n_steps)
        self._first_bad: torch.Tensor | None = None  # the first step whose loss was not finite (-1: none)
        self._bad_value: torch.Tensor | None = None
        self._batch_idx = 0
        self._seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), dtype=loss.dtype, device=loss.device)
        fresh = (~torch.isfinite(loss)) & (self._first_bad < 0)  # on the device: no host sync
        self._first_bad = torch.where(fresh, torch.as_tensor(trainer.global_step, device=loss.device), self._first_bad)
        self._bad_value = torch.where(fresh, loss, self._bad_value)
        self._seen += 1
        if self._seen % self.every_n_steps == 0:
            self.check(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.check(trainer)  # before anything is written: a non-finite update never reaches a checkpoint

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: pl.Trainer) -> None:
        """Read the record back (one host sync; one collective under DDP); raise when a loss was not finite."""
        first = -1 if self._first_bad is None else int(self._first_bad)
        if not trainer.strategy.reduce_boolean_decision(first >= 0, all=False):
            return
        ckpt = getattr(trainer.checkpoint_callback, "dirpath", None)
        last = Path(ckpt) / "last.ckpt" if ckpt else None
        kept = f"the last good checkpoint is {last}" if last and last.is_file() else "no checkpoint was written"
        value = float(self._bad_value) if first >= 0 else float("nan")
        where = (
            f"step {first} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
            if self.every_n_steps == 1
            else f"step {first} (noticed at step {trainer.global_step}, epoch {trainer.current_epoch})"
        )
        raise NonFiniteLossError(
            f"training loss became {value} at {where}; training stopped and {kept}. Lower optimizer.lr, set "
            "trainer.gradient_clip_val=1.0 or check the data"
        )
