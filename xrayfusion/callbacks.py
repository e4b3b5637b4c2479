"""Lightning callbacks of the project."""

from __future__ import annotations

import pytorch_lightning as pl


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
