"""Decode image files once into uint8 grey tensors at a fixed size."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Failure:
    """A file that could not be read, with the reason."""

    path: str
    reason: str


def load_grey(path: str | Path, size: int) -> np.ndarray:
    """Read one image as a (size, size) uint8 grey array; raises ValueError with a reason."""
    path = Path(path)
    if not path.exists():
        raise ValueError("file not found")
    if path.stat().st_size == 0:
        raise ValueError("zero-byte file")
    try:
        with Image.open(path) as img:
            img.load()
            grey = _to_grey(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode image ({err})") from err
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(grey, dtype=np.uint8)


def _to_grey(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    return img.convert("L")


def decode_images(
    paths: Sequence[str | Path], size: int, workers: int = 2
) -> tuple[torch.Tensor, list[int], list[Failure]]:
    """Decode `paths` into a (N_ok, 1, size, size) uint8 tensor.

    Returns the tensor, the indices of `paths` that decoded, and the failures.
    """

    def one(p: str | Path) -> np.ndarray | Failure:
        try:
            return load_grey(p, size)
        except ValueError as err:
            return Failure(str(p), str(err))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, paths))
    ok = [i for i, r in enumerate(results) if not isinstance(r, Failure)]
    failures = [r for r in results if isinstance(r, Failure)]
    if ok:
        stacked = np.stack([results[i] for i in ok])[:, None]
        images = torch.from_numpy(stacked)
    else:
        images = torch.empty((0, 1, size, size), dtype=torch.uint8)
    return images, ok, failures
