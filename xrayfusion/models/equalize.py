"""Histogram equalisation and CLAHE as input normalisation, inside the model (kornia, on the device).

`model.equalize=hist|clahe` is part of the model's preprocessing (`FusionClassifier.preprocess`), stored in its
hyperparameters, so validation, test, evaluate, predict and the served model equalise every image alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from kornia.enhance import equalize, equalize_clahe

from xrayfusion.core.errors import ConfigError

EQUALIZE_MODES = ("none", "hist", "clahe")


def check_equalize(mode: str, clip_limit: float, grid: Sequence[int], image_size: int) -> None:
    """ConfigError for an unknown mode, a negative clip limit or a CLAHE grid the image size cannot tile."""
    if mode not in EQUALIZE_MODES:
        raise ConfigError(f"model.equalize={mode!r} is unknown; choose one of {list(EQUALIZE_MODES)}")
    if mode != "clahe":
        return
    if clip_limit is None or float(clip_limit) < 0:
        raise ConfigError(f"model.clahe.clip_limit={clip_limit} must be >= 0 (0: no clipping; OpenCV's default 40)")
    cells = list(grid) if isinstance(grid, Sequence) and not isinstance(grid, str) else []
    if len(cells) != 2 or not all(isinstance(g, int) and g >= 1 for g in cells):
        raise ConfigError(f"model.clahe.grid={grid} must be two tile counts >= 1, e.g. 'model.clahe.grid=[8,8]'")
    if max(cells) >= int(image_size):
        raise ConfigError(
            f"model.clahe.grid={cells} needs images larger than {max(cells)} px (data.image_size={image_size}); "
            "use fewer tiles"
        )


def equalize_images(x: torch.Tensor, mode: str, clip_limit: float = 40.0, grid: Sequence[int] = (8, 8)) -> torch.Tensor:
    """[0, 1] float images (B, C, H, W), equalised per image and channel: `hist` (kornia.enhance.equalize, a
    256-bin global histogram like PIL's) or `clahe` (kornia.enhance.equalize_clahe); `none` returns `x`.

    Always computed in float32 (outside any autocast), so bf16 models equalise exactly like float32 ones.
    """
    if mode == "none":
        return x
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        if mode == "hist":
            return equalize(x)
        if mode == "clahe":
            return equalize_clahe(x, clip_limit=float(clip_limit), grid_size=(int(grid[0]), int(grid[1])))
    raise ConfigError(f"model.equalize={mode!r} is unknown; choose one of {list(EQUALIZE_MODES)}")
