"""What every source yields: ImageSets (decoded uint8 images, labels, patients, names) and SourceData."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xrayfusion.core.errors import DataError
from xrayfusion.data.decode import Failure, decode_files


@dataclass
class ImageSet:
    """Decoded images (N, 1, H, W) uint8, labels (N,), patient groups, file names, original (width, height)."""

    images: torch.Tensor
    labels: torch.Tensor
    groups: list[str]
    names: list[str]
    sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray) -> ImageSet:
        idx_list = [int(i) for i in idx]
        index = torch.as_tensor(idx_list, dtype=torch.long)
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            groups=[self.groups[i] for i in idx_list],
            names=[self.names[i] for i in idx_list],
            sizes=[self.sizes[i] for i in idx_list] if self.sizes is not None else None,
        )

    def digest(self) -> str:
        """A short digest of the file names (order-free): what identifies a split across runs and commands."""
        return hashlib.sha256("\n".join(sorted(self.names)).encode()).hexdigest()[:16]

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class SourceData:
    """What a source yields: class names, the splits (val/test may be absent) and unreadable files."""

    class_names: list[str]
    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    skipped: list[Failure] = field(default_factory=list)


def decode_set(
    paths: Sequence[Path],
    labels: Sequence[int],
    groups: Sequence[str],
    names: Sequence[str],
    size: int,
    workers: int,
    cache_dir: str | Path | None = None,
) -> tuple[ImageSet, list[Failure]]:
    """Decode `paths` (through the decode cache when `cache_dir` is set) into an ImageSet, plus the failures."""
    decoded = decode_files(paths, size, workers=workers, cache_dir=cache_dir)
    ok = decoded.ok
    image_set = ImageSet(
        images=decoded.images,
        labels=torch.as_tensor([labels[i] for i in ok], dtype=torch.long),
        groups=[groups[i] for i in ok],
        names=[names[i] for i in ok],
        sizes=decoded.sizes,
    )
    return image_set, decoded.failures


def check_classes(split_name: str, split: ImageSet | None, class_names: Sequence[str], where: str) -> None:
    """A split with no image of some class cannot be trained or validated on: fail naming the classes."""
    if split is None:
        return
    counts = split.class_counts(len(class_names))
    empty = [c for c, n in zip(class_names, counts, strict=True) if n == 0]
    if empty:
        raise DataError(
            f"the {split_name} split of {where} has no readable images of class(es) {empty} "
            f"(class counts {dict(zip(class_names, counts, strict=True))}); add images of those classes or "
            "remove them from the data"
        )
