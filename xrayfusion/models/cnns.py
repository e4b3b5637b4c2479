"""The project's own CNNs, registered in timm's model registry so `timm.create_model` builds them."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

PROJECT_CNNS = ("small_cnn", "darknet")  # no pretrained weights exist for these


def _conv(c_in: int, c_out: int, k: int = 3, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(c_out),
        act(inplace=True) if act is nn.ReLU else act(0.1, inplace=True),
    )


class _TimmLike(nn.Module):
    """timm's classifier interface: num_features, forward_features, forward_head, reset_classifier."""

    num_features: int

    def _init_head(self, num_classes: int, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SmallCNN(_TimmLike):
    """A compact "intuitive" CNN: three conv-BN-ReLU-pool stages and global average pooling."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, width: int = 32):
        super().__init__()
        widths = (width, width * 2, width * 4)
        layers: list[nn.Module] = []
        c_in = in_chans
        for c_out in widths:
            layers += [_conv(c_in, c_out), _conv(c_out, c_out), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]
        self._init_head(num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _triple(c_in: int, c_out: int) -> nn.Sequential:
    leaky = nn.LeakyReLU
    return nn.Sequential(_conv(c_in, c_out, 3, leaky), _conv(c_out, c_in, 1, leaky), _conv(c_in, c_out, 3, leaky))


class DarkCovidNet(_TimmLike):
    """DarkNet-19 derivative of Ozturk et al. 2020 (DarkCovidNet): 17 conv layers, LeakyReLU, 5 max-pools."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        leaky = nn.LeakyReLU
        self.features = nn.Sequential(
            _conv(in_chans, 8, 3, leaky),
            nn.MaxPool2d(2),
            _conv(8, 16, 3, leaky),
            nn.MaxPool2d(2),
            _triple(16, 32),
            nn.MaxPool2d(2),
            _triple(32, 64),
            nn.MaxPool2d(2),
            _triple(64, 128),
            nn.MaxPool2d(2),
            _triple(128, 256),
            _conv(256, 128, 1, leaky),
            _conv(128, 256, 3, leaky),
        )
        self.num_features = 256
        self._init_head(num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _build(cls: type[_TimmLike], pretrained: bool, kwargs: dict[str, Any]) -> _TimmLike:
    if pretrained:
        raise ValueError(f"{cls.__name__} has no pretrained weights; set model.pretrained=false for it")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        kwargs.pop(key, None)
    return cls(**kwargs)


@register_model
def small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Compact 6-conv CNN (the seeds' "intuitive" CNN)."""
    return _build(SmallCNN, pretrained, kwargs)


@register_model
def darknet(pretrained: bool = False, **kwargs: Any) -> DarkCovidNet:
    """DarkCovidNet (Ozturk et al. 2020), a DarkNet-19 derivative."""
    return _build(DarkCovidNet, pretrained, kwargs)
