"""Checks of a composed config that must fail before any data is read or any model is trained."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xrayfusion import fusion_fit
from xrayfusion.errors import ConfigError
from xrayfusion.models.backbones import check_backbone_name, check_input_size, create_backbone
from xrayfusion.models.fusion import FUSIONS


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first invalid value, naming it and the fix."""
    branches = cfg["model"].get("branches")
    if not branches or isinstance(branches, str):
        raise ConfigError(f"model.branches={branches!r} must be a non-empty list, e.g. 'model.branches=[resnet18]'")
    fusion = cfg["fusion"].get("name")
    if fusion not in FUSIONS:
        raise ConfigError(f"unknown fusion {fusion!r}; choose fusion= one of {list(FUSIONS)}")
    if fusion in ("stacking", "voting") and len(branches) < 2:
        raise ConfigError(
            f"fusion={fusion} needs at least two branches but model.branches={list(branches)} has one; "
            "add a branch or use fusion=average"
        )
    fusion_fit.validate(cfg)
    lr = cfg["optimizer"].get("lr")
    if lr is None or float(lr) <= 0:
        raise ConfigError(f"optimizer.lr={lr} must be a positive number, e.g. optimizer.lr=1e-3")
    batch_size = cfg["data"].get("batch_size")
    if batch_size is None or int(batch_size) <= 0:
        raise ConfigError(f"data.batch_size={batch_size} must be a positive integer, e.g. data.batch_size=32")
    epochs = cfg["trainer"].get("max_epochs")
    if epochs is not None and int(epochs) <= 0 and int(epochs) != -1:
        raise ConfigError(f"trainer.max_epochs={epochs} must be positive")
    for name in branches:
        check_backbone_name(str(name))
    size = int(cfg["data"].get("image_size", 64))
    in_chans = int(cfg["model"].get("in_chans", 1))
    for name in branches:
        check_input_size(str(name), create_backbone(str(name), in_chans=in_chans), in_chans, size)
