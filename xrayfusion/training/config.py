"""Checks of a composed config that must fail before any data is read or any model is trained."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xrayfusion.core.errors import ConfigError
from xrayfusion.data.registry import check_source_name
from xrayfusion.fusion.checks import validate_fusion
from xrayfusion.models.backbones import check_backbone_name
from xrayfusion.models.equalize import check_equalize
from xrayfusion.models.mixup import mixup_settings
from xrayfusion.models.module import bf16_branch_indices, branch_entries, branch_input_sizes
from xrayfusion.models.precision import FALLBACK_FLOAT32, FALLBACKS
from xrayfusion.models.pretrained import has_pretrained, resolve_weights
from xrayfusion.models.tta import DEFAULT_SCALES, check_tta
from xrayfusion.training.callbacks import ema_settings


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first invalid value, naming it and the fix.

    Checks names and values only (no backbone is built here); whether each backbone takes the image size is
    checked once, when the model is built.
    """
    branches = cfg["model"].get("branches")
    if not branches or isinstance(branches, str):
        raise ConfigError(f"model.branches={branches!r} must be a non-empty list, e.g. 'model.branches=[resnet18]'")
    check_source_name(cfg["data"].get("name"))
    check_tta(cfg["model"].get("tta", "none"), cfg["model"].get("tta_scales", DEFAULT_SCALES))
    if not isinstance(cfg["model"].get("tta_each_epoch", True), bool):
        raise ConfigError(f"model.tta_each_epoch={cfg['model'].get('tta_each_epoch')!r} must be true or false")
    clahe = cfg["model"].get("clahe") or {}
    check_equalize(
        cfg["model"].get("equalize") or "none",
        clahe.get("clip_limit", 40.0),
        clahe.get("grid", [8, 8]),
        int(cfg["data"].get("image_size") or 64),
    )
    mixup_settings(cfg["model"].get("mixup"))
    ema_settings(cfg["model"].get("ema"))
    validate_fusion(cfg, len(branches))
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
    branch_input_sizes(
        [str(b) for b in branches],
        int(cfg["data"].get("image_size") or 64),
        branch_sizes_of(cfg["model"].get("branch_sizes")),
    )
    _check_transfer(cfg["model"], [str(b) for b in branches])
    fallback = cfg["model"].get("bf16_fallback") or FALLBACK_FLOAT32
    if fallback not in FALLBACKS:
        raise ConfigError(
            f"model.bf16_fallback={fallback!r} must be one of {', '.join(FALLBACKS)}: what named bf16 branches do on "
            "a CPU without bf16 units, e.g. model.bf16_fallback=float32"
        )
    try:
        bf16_branch_indices([str(b) for b in branches], cfg["model"].get("bf16_branches"))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def branch_sizes_of(value: Any) -> dict[str, int] | None:
    """model.branch_sizes as {branch name: size} (None when unset); ConfigError when it is not a mapping."""
    if not value:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"model.branch_sizes={value!r} must map branch names to sizes, e.g. 'model.branch_sizes={{small_cnn: 96}}'"
        )
    return {str(k): v for k, v in value.items()}


def _check_trainable_layers(layers: Any, branches: list[str]) -> None:
    """null, a number of top stages >= 0, or {branch name or key: that or null} naming branches of the model."""
    if isinstance(layers, Mapping):
        branch_entries("trainable_layers", branches, layers)
        for name, value in layers.items():
            if value is not None and not _stage_count(value):
                raise ConfigError(
                    f"model.trainable_layers.{name}={value!r} must be null (all) or a number of top stages >= 0"
                )
    elif layers is not None and not _stage_count(layers):
        raise ConfigError(
            f"model.trainable_layers={layers!r} must be null (all), a number of top stages >= 0 or a mapping "
            "{branch: stages}, e.g. model.trainable_layers=0 or 'model.trainable_layers={efficientnet_lite1: 0}'"
        )


def _stage_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_transfer(model: Mapping[str, Any], branches: list[str]) -> None:
    """Pretrained weights exist (offline: the files are in model.weights_dir); freezing options are valid."""
    epochs = model.get("freeze_backbone_epochs") or 0
    if int(epochs) < 0:
        raise ConfigError(f"model.freeze_backbone_epochs={epochs} must be 0 or more")
    _check_trainable_layers(model.get("trainable_layers"), branches)
    scale = model.get("backbone_lr_scale", 0.1)
    if scale is None or float(scale) <= 0:
        raise ConfigError(f"model.backbone_lr_scale={scale} must be a positive number, e.g. 0.1")
    if not model.get("pretrained"):
        return
    if not any(has_pretrained(b) for b in branches):
        raise ConfigError(
            f"model.pretrained=true but no branch of {branches} has ImageNet weights (the project CNNs train "
            "from scratch); add a timm branch or set model.pretrained=false"
        )
    for name in branches:
        resolve_weights(name, model.get("weights_dir"))
