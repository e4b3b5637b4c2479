"""Freeze-then-unfreeze fine-tuning of pretrained backbones on Lightning's BaseFinetuning machinery."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from xrayfusion.models.backbones import top_stages, train_trainable_batchnorm
from xrayfusion.models.module import branch_entries

log = logging.getLogger(__name__)

_SCALED_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group values that schedulers keep


class BackboneFreeze(BaseFinetuning):
    """Train heads (and the fusion head) only for `freeze_epochs`, then unfreeze the backbones' top
    `trainable_layers` stages (all when None; a mapping gives each branch key its own) with `lr_scale` x the head
    learning rate, following its schedule.

    Frozen parameters have `requires_grad=False`, so they get no gradients and no optimizer state; frozen
    BatchNorm layers run in eval mode (running statistics of the pretrained weights, not updated).
    """

    def __init__(
        self,
        freeze_epochs: int = 0,
        trainable_layers: int | Mapping[str, int | None] | None = None,
        lr_scale: float = 0.1,
        keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.freeze_epochs = int(freeze_epochs)
        self.trainable_layers = trainable_layers  # one K for every branch, or {branch key: K or None}
        self.lr_scale = float(lr_scale)
        self.keys = list(keys) if keys is not None else None  # branches to freeze; None = all
        self._unfrozen = False

    def _keys(self, pl_module: pl.LightningModule) -> list[str]:
        return self.keys if self.keys is not None else list(pl_module.backbones.keys())

    def _backbones(self, pl_module: pl.LightningModule) -> list[nn.Module]:
        return [pl_module.backbones[k] for k in self._keys(pl_module)]

    def _top(self, key: str) -> int | None:
        if isinstance(self.trainable_layers, Mapping):
            return self.trainable_layers.get(key)
        return self.trainable_layers

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(self._backbones(pl_module), train_bn=False)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self._unfrozen or epoch < self.freeze_epochs:
            return
        self._unfrozen = True
        modules = [m for k in self._keys(pl_module) for m in top_stages(pl_module.backbones[k], self._top(k))]
        if not modules:
            return
        n_groups = len(optimizer.param_groups)
        lr = optimizer.param_groups[0]["lr"] * self.lr_scale
        self.unfreeze_and_add_param_group(modules, optimizer, lr=lr, train_bn=True)
        if len(optimizer.param_groups) > n_groups:
            self._follow_schedule(pl_module.trainer, optimizer)
        n_params = sum(p.numel() for m in modules for p in m.parameters(recurse=False))
        log.info("epoch %d: unfroze %d backbone parameters (lr x %g)", epoch, n_params, self.lr_scale)

    def _follow_schedule(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        """Give the new param group the first group's scheduler state, learning rates scaled."""
        first, new = optimizer.param_groups[0], optimizer.param_groups[-1]
        for key, value in first.items():
            if key in _SCALED_KEYS:
                new[key] = value * self.lr_scale
            elif key not in new:
                new[key] = value
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs.append(scheduler.base_lrs[0] * self.lr_scale)
                if hasattr(scheduler, "_last_lr"):
                    scheduler._last_lr.append(new["lr"])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        for backbone in self._backbones(pl_module):
            train_trainable_batchnorm(backbone)


def freeze_callbacks(model_cfg: Mapping[str, Any], model: pl.LightningModule) -> list[pl.Callback]:
    """[BackboneFreeze] when `model.freeze_backbone_epochs` or `model.trainable_layers` asks for it, else [].

    A number for `model.trainable_layers` applies to the branches that loaded pretrained weights (all of them when
    none did); a mapping ({branch name or key: K or null}) to the branches it names, whatever their weights.
    """
    stages = stage_plan(model_cfg, model)
    if not stages:
        return []
    epochs = int(model_cfg.get("freeze_backbone_epochs") or 0)
    scale = float(model_cfg.get("backbone_lr_scale", 0.1))
    never = [key for key, k in stages.items() if k == 0]
    later = {key: "all" if k is None else k for key, k in stages.items() if k != 0}
    parts = [f"frozen all run: {never}"] if never else []
    if later:
        when = f"after {epochs} epoch(s)" if epochs else "from the start"
        parts.append(f"trained {when} at lr x {scale:g}, top stages per branch: {later}")
    log.info("freezing backbones: %s", "; ".join(parts))
    return [BackboneFreeze(epochs, stages, scale, list(stages))]


def stage_plan(model_cfg: Mapping[str, Any], model: pl.LightningModule) -> dict[str, int | None]:
    """{branch key: K, or None for every stage} for the branches BackboneFreeze freezes before training and then
    trains the top K stages of ({} when nothing is frozen).

    `model.trainable_layers` null or K: with `model.freeze_backbone_epochs` or K, the pretrained branches (all when
    none is), each with that K. A mapping {branch name or key: K or null}: the named branches with their K, and, with
    `model.freeze_backbone_epochs`, the pretrained ones it does not name, which then train every stage.
    """
    epochs = int(model_cfg.get("freeze_backbone_epochs") or 0)
    layers = model_cfg.get("trainable_layers")
    if not isinstance(layers, Mapping):
        if not epochs and layers is None:
            return {}
        return {key: None if layers is None else int(layers) for key in _frozen_keys(model)}
    named = branch_entries("trainable_layers", list(model.hparams.branches), layers)
    frozen_first = _frozen_keys(model) if epochs else []
    plan: dict[str, int | None] = {}
    for i, key in enumerate(model.keys):
        value = named.get(i)
        if value is not None or key in frozen_first:
            plan[key] = None if value is None else int(value)
    return plan


def _frozen_keys(model: pl.LightningModule) -> list[str]:
    """The branches freezing applies to: those that loaded pretrained weights (all of them when none did)."""
    return [k for k, source in model.weights_sources.items() if source] or list(model.weights_sources)


def trained_top_stages(model_cfg: Mapping[str, Any], model: pl.LightningModule) -> dict[str, int]:
    """{branch key: K} for the branches that train only their top K stages for the whole run
    (`model.trainable_layers`): what a timing of their training step (`model.bf16_branches=auto`) should time."""
    return {key: k for key, k in stage_plan(model_cfg, model).items() if k is not None}


def frozen_for_whole_run(model_cfg: Mapping[str, Any], model: pl.LightningModule, max_epochs: int | None) -> list[str]:
    """Keys of the pretrained branches whose backbone never trains in this run: those `freeze_callbacks` freezes
    with no stage to train (`model.trainable_layers` 0 for them), or all it freezes when
    `model.freeze_backbone_epochs` covers every epoch. What model.feature_cache may cache."""
    epochs = int(model_cfg.get("freeze_backbone_epochs") or 0)
    whole_run = max_epochs is not None and max_epochs > 0 and epochs >= max_epochs
    return [
        key
        for key, k in stage_plan(model_cfg, model).items()
        if (k == 0 or whole_run) and model.weights_sources.get(key)
    ]
