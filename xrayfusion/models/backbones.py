"""One factory for every branch backbone: any timm model name or a project CNN."""

from __future__ import annotations

import difflib
import logging
from functools import cache
from pathlib import Path

import timm
import torch
from torch import nn

from xrayfusion.core.errors import ConfigError
from xrayfusion.core.modes import eval_mode
from xrayfusion.models import cnns  # noqa: F401  (registers the project CNNs)
from xrayfusion.models.pretrained import PretrainedWeights, file_keys, resolve_weights

log = logging.getLogger(__name__)

_CANDIDATE_SIZES = (32, 48, 64, 96, 128, 160, 192, 224, 256, 299, 320, 384)


@cache
def known_backbones() -> frozenset[str]:
    """Every name `create_backbone` accepts (timm's registry, project CNNs included)."""
    return frozenset(timm.list_models())


def check_backbone_name(name: str) -> None:
    """Raise ConfigError naming close matches when `name` is not a known backbone."""
    base = name.split(".", 1)[0]  # timm accepts name.pretrained_tag
    if base in known_backbones():
        return
    close = difflib.get_close_matches(base, sorted(known_backbones()), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown backbone {name!r} in model.branches{hint} Any timm model name "
        "(python -c 'import timm; print(timm.list_models())') or a project CNN (small_cnn, darknet) works."
    )


def create_backbone(
    name: str,
    in_chans: int = 1,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    weights_dir: str | Path | None = None,
) -> nn.Module:
    """A feature extractor (`num_classes=0`) exposing `num_features`; pooled features from `forward`.

    `pretrained=True` loads ImageNet weights through timm (from `weights_dir/<name>*.pth|.safetensors`, else
    timm's hub) and records where they came from in `weights_source`; project CNNs stay randomly initialised.
    """
    check_backbone_name(name)
    kwargs = {"num_classes": 0, "in_chans": in_chans}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    weights = resolve_weights(name, weights_dir) if pretrained else None
    if weights is None:
        if pretrained:
            log.warning("backbone %s has no ImageNet weights (a project CNN): it trains from scratch", name)
        backbone = timm.create_model(name, **kwargs)
        backbone.weights_source = None
        return backbone
    return _create_pretrained(name, weights, kwargs)


def _create_pretrained(name: str, weights: PretrainedWeights, kwargs: dict) -> nn.Module:
    try:  # timm's own loader: weights_only=True, in_chans adaptation of the first conv, classifier dropped
        backbone = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(weights.path)}, **kwargs
        )
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"weights {weights.describe()} do not fit backbone {name!r}: {err}") from err
    expected = {k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - file_keys(weights.path))
    if missing:
        raise ConfigError(
            f"weights {weights.describe()} do not fit backbone {name!r}: {len(missing)} of {len(expected)} tensors "
            f"missing (e.g. {', '.join(missing[:3])}); use a state dict saved from timm's {name}"
        )
    backbone.weights_source = weights.describe()
    log.info("backbone %s: ImageNet weights loaded from %s", name, weights.describe())
    return backbone


def input_stats(backbone: nn.Module, in_chans: int) -> tuple[list[float], list[float]] | None:
    """Per-channel mean/std of the backbone's pretrained weights (grey = RGB average); None when it has none."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        return None
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if in_chans != len(mean):
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return mean, std


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features `forward` returns: timm's `head_hidden_size` (VGG's 4096-wide pre-logits
    layer) where a model has one, else `num_features`."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def _forward_ok(backbone: nn.Module, in_chans: int, size: int) -> bool:
    try:
        backbone(torch.zeros(1, in_chans, size, size))
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False


def check_input_size(name: str, backbone: nn.Module, in_chans: int, size: int) -> None:
    """Raise ConfigError when `backbone` cannot take `size` px inputs, naming a size that works."""
    with eval_mode(backbone):
        if _forward_ok(backbone, in_chans, size):
            return
        working = next((s for s in _CANDIDATE_SIZES if s > size and _forward_ok(backbone, in_chans, s)), None)
    fix = f"use data.image_size={working} or more" if working else "use a larger data.image_size"
    raise ConfigError(
        f"backbone {name!r} cannot take {size}x{size} px images (its down-sampling shrinks them to nothing); "
        f"{fix}, or drop {name} from model.branches."
    )


def backbone_stages(backbone: nn.Module) -> list[list[nn.Module]]:
    """Modules holding parameters, grouped by stage from input to output.

    Stages are timm's coarse parameter groups (`group_matcher(coarse=True)`: stem, each block stage, head
    conv); models without a group matcher (the project CNNs) use their top-level layers.
    """
    owners = {name: m for name, m in backbone.named_modules() if list(m.parameters(recurse=False))}
    if hasattr(backbone, "group_matcher"):
        groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True))
        stage_of = {pname: i for i, (_, names) in enumerate(sorted(groups.items())) for pname in names}
        stages: list[list[nn.Module]] = [[] for _ in groups]
        for name, module in owners.items():
            first = next(n for n, _ in module.named_parameters(recurse=False))
            stages[stage_of[f"{name}.{first}" if name else first]].append(module)
        return [s for s in stages if s]
    layers = []
    for child in backbone.children():
        layers += list(child.children()) if isinstance(child, nn.Sequential) else [child]
    return [[m] for m in layers if any(True for _ in m.parameters())]


def top_stages(backbone: nn.Module, k: int | None) -> list[nn.Module]:
    """The modules of the top `k` stages (all when k is None)."""
    stages = backbone_stages(backbone)
    chosen = stages if k is None else stages[len(stages) - k :] if k > 0 else []
    return [m for stage in chosen for m in stage]


def below_top(backbone: nn.Module, k: int | None) -> list[nn.Parameter]:
    """The parameters of `backbone` outside its top `k` stages: what `model.trainable_layers=k` keeps frozen."""
    top = {id(p) for m in top_stages(backbone, k) for p in m.parameters(recurse=False)}
    return [p for p in backbone.parameters() if id(p) not in top]


def freeze_below_top(backbone: nn.Module, k: int) -> None:
    """Freeze all but the top `k` stages of `backbone` in place, as a run with `model.trainable_layers=k` trains
    it: the lower stages get no gradients and their BatchNorm layers run in eval mode."""
    frozen = {id(p) for p in below_top(backbone, k)}
    for p in backbone.parameters():
        p.requires_grad_(id(p) not in frozen)
    train_trainable_batchnorm(backbone)


def train_trainable_batchnorm(backbone: nn.Module) -> None:
    """BatchNorm layers with trainable parameters in train mode, frozen ones in eval mode (running statistics
    of the pretrained weights, not updated)."""
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(any(p.requires_grad for p in module.parameters()))
