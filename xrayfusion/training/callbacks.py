"""Lightning callbacks of the project: the epoch history for plots, the non-finite-loss guard and the
exponential moving average (EMA) of the weights."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from xrayfusion.core.errors import ConfigError, XrayfusionError


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


# ---- EMA of the weights ---------------------------------------------------------------------------------
EMA_DEFAULTS: dict[str, Any] = {"enabled": False, "decay": 0.999, "warmup": True, "every_n_steps": 1}


def ema_settings(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """`model.ema` completed with the defaults and checked; ConfigError names a bad key or value."""
    given = dict(cfg or {})
    unknown = sorted(set(given) - set(EMA_DEFAULTS))
    if unknown:
        raise ConfigError(f"model.ema.{unknown[0]} is not a key; the keys are {list(EMA_DEFAULTS)}")
    settings = {k: default if given.get(k) is None else given[k] for k, default in EMA_DEFAULTS.items()}
    if not 0 < float(settings["decay"]) < 1:
        raise ConfigError(f"model.ema.decay={settings['decay']} must be in (0, 1), e.g. 0.999")
    if int(settings["every_n_steps"]) < 1:
        raise ConfigError(f"model.ema.every_n_steps={settings['every_n_steps']} must be >= 1")
    return settings


class ExponentialMovingAverage(WeightAveraging):
    """EMA of every parameter and buffer (BatchNorm statistics included), on Lightning's `WeightAveraging`.

    What WeightAveraging does, and the run relies on: validation runs on the averaged weights (so the best
    epoch is chosen by them), every checkpoint ModelCheckpoint writes holds them as its `state_dict` (the raw
    weights go to `current_model_state`, so a resumed run continues both), and the model holds them when
    training ends. What this class adds: the decay warms up as in timm's ModelEmaV3 (`warmup`:
    min(decay, 1 - (1 + step)^-3/4), so early, random weights fade within a short run), updates every
    `every_n_steps` optimizer steps, and an update reads nothing back from the device (torch's
    `AveragedModel.update_parameters` reads its update counter on the host every step).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1) -> None:
        super().__init__(use_buffers=True)
        self.decay, self.warmup, self.every_n_steps = float(decay), bool(warmup), int(every_n_steps)
        self._updates = 0  # updates made (host-side; a resumed average counts as started)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step) ** -0.75)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.every_n_steps == 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > self._latest_update_step and self.should_update(step_idx=step - 1):
            self._update(pl_module, step)
            self._latest_update_step = step

    @torch.no_grad()
    def _update(self, pl_module: pl.LightningModule, step: int) -> None:
        average = self._average_model
        assert average is not None
        first = self._updates == 0
        pairs = zip(
            itertools.chain(average.module.parameters(), average.module.buffers()),
            itertools.chain(pl_module.parameters(), pl_module.buffers()),
            strict=True,
        )
        floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for avg, current in pairs:
            if first or not avg.is_floating_point():
                avg.copy_(current)  # the first update starts the average; integer buffers follow the model
            else:
                floats[0].append(avg)
                floats[1].append(current.detach())
        if floats[0]:
            get_ema_multi_avg_fn(self.decay_at(step))(floats[0], floats[1], None)
        average.n_averaged += 1  # on the device: no host read
        self._updates += 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._updates = int(self._latest_update_step > 0)  # resumed: the average exists, keep averaging


def ema_callbacks(model_cfg: Mapping[str, Any]) -> list[pl.Callback]:
    """[ExponentialMovingAverage] when `model.ema.enabled`, else []."""
    settings = ema_settings(model_cfg.get("ema"))
    if not settings["enabled"]:
        return []
    return [
        ExponentialMovingAverage(float(settings["decay"]), bool(settings["warmup"]), int(settings["every_n_steps"]))
    ]
