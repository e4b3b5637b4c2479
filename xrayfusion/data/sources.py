"""Data sources: each turns a config into decoded train/val/test ImageSets and class names."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xrayfusion.data.decode import Failure, decode_files
from xrayfusion.data.splits import carve_validation, patient_id
from xrayfusion.errors import ConfigError, DataError


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


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder` (any depth), sorted; unreadable ones are reported when decoded."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts)
    )


def _folder_group(cls_dir: Path, path: Path, group_fn: Callable[[str], str]) -> str:
    """The patient: the first sub-folder under the class folder when files are nested, else from the name."""
    rel = path.relative_to(cls_dir)
    return rel.parts[0] if len(rel.parts) > 1 else group_fn(path.name)


def _folder_split(
    split_dir: Path,
    class_names: Sequence[str],
    size: int,
    group_fn: Callable[[str], str],
    workers: int,
    cache_dir: str | Path | None = None,
) -> tuple[ImageSet, list[Failure]]:
    paths: list[Path] = []
    labels: list[int] = []
    groups: list[str] = []
    failures: list[Failure] = []
    for label, cls in enumerate(class_names):
        cls_dir = split_dir / cls
        files = list_files(cls_dir) if cls_dir.is_dir() else []
        paths += files
        labels += [label] * len(files)
        groups += [_folder_group(cls_dir, p, group_fn) for p in files]
    for extra in sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name not in class_names):
        if not extra.name.startswith("."):
            failures += [
                Failure(str(p), f"class folder '{extra.name}' is not one of the classes {list(class_names)}")
                for p in list_files(extra)
            ]
    names = [str(p.relative_to(split_dir)) for p in paths]
    image_set, failed = decode_set(paths, labels, groups, names, size, workers, cache_dir)
    return image_set, failures + failed


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


def _find_split(root: Path, aliases: Sequence[str]) -> Path | None:
    for name in aliases:
        if (root / name).is_dir():
            return root / name
    return None


def load_folder_source(
    root: str | Path,
    size: int,
    val_fraction: float,
    seed: int,
    group_fn: Callable[[str], str] = patient_id,
    class_names: Sequence[str] | None = None,
    workers: int = 2,
    cache_dir: str | Path | None = None,
) -> SourceData:
    """Read ROOT/{train,test[,val]}/<class>/**; carve val out of train by patient when val/ is absent.

    Classes are `class_names` (each must hold images in train/) or, when None, the sorted names of train/'s
    sub-folders; an empty discovered class folder is dropped and reported. `cache_dir` keeps decoded arrays.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data.root={root} does not exist; point data.root at the folder that holds train/ and test/ "
            "(for Kermany: the Kaggle 'chest-xray-pneumonia' download's chest_xray/ folder)"
        )
    train_dir = root / "train"
    if not train_dir.is_dir():
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(
            f"data.root={root} has no train/ folder; expected ROOT/train/<class>/* and ROOT/test/<class>/*, "
            f"found {found}"
        )
    skipped: list[Failure] = []
    if class_names is None:
        folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        class_names = [c for c in folders if list_files(train_dir / c)]
        skipped += [
            Failure(str(train_dir / c), "empty class folder: no files in train/, class dropped")
            for c in folders
            if c not in class_names
        ]
    else:
        missing = [c for c in class_names if not (train_dir / c).is_dir()]
        if missing:
            found = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
            raise DataError(
                f"{train_dir} has no class folder(s) {missing}; expected {train_dir}/<class>/* for classes "
                f"{list(class_names)}, found folders {found}"
            )
    if len(class_names) < 2:
        raise DataError(
            f"{train_dir} holds {len(class_names)} non-empty class folder(s) {list(class_names)}; at least two "
            "are needed (expected ROOT/train/<class>/* with one folder per class)"
        )
    train, failed = _folder_split(train_dir, class_names, size, group_fn, workers, cache_dir)
    skipped += failed
    val = test = None
    val_dir = _find_split(root, ("val", "valid", "validation"))
    if val_dir is not None:
        val, failed = _folder_split(val_dir, class_names, size, group_fn, workers, cache_dir)
        skipped += failed
    else:
        check_classes("train", train, class_names, str(root))
        train_idx, val_idx = carve_validation(train.labels.tolist(), train.groups, val_fraction, seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    test_dir = _find_split(root, ("test", "testing"))
    if test_dir is not None:
        test, failed = _folder_split(test_dir, class_names, size, group_fn, workers, cache_dir)
        skipped += failed
    check_classes("train", train, class_names, str(root))
    check_classes("val", val, class_names, str(root))
    return SourceData(list(class_names), train, val, test, skipped)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def load_medmnist(path: str | Path, size: int, class_names: Sequence[str] | None = None) -> SourceData:
    """Read a MedMNIST npz with train/val/test images and labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data.path={path} is not a file; point it at a MedMNIST npz such as pneumoniamnist.npz "
            "(or set XRAYFUSION_MEDMNIST_NPZ)"
        )
    with np.load(path) as npz:
        expected = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
        missing = [k for k in expected if k not in npz.files]
        if missing:
            raise DataError(f"{path} lacks the MedMNIST keys {missing}; it has {sorted(npz.files)}")
        arrays = {k: npz[k] for k in expected}
    num_classes = int(max(arrays[f"{s}_labels"].max() for s in ("train", "val", "test"))) + 1
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise ConfigError(f"data.class_names has {len(names)} names but {path} has {num_classes} classes")
    splits = {}
    for split in ("train", "val", "test"):
        imgs = torch.from_numpy(arrays[f"{split}_images"])
        if imgs.ndim == 4:  # (N, H, W, 3) colour variants: average to grey
            imgs = imgs.float().mean(-1).round().to(torch.uint8)
        imgs = _resize_uint8(imgs[:, None], size)
        labels = torch.from_numpy(arrays[f"{split}_labels"].reshape(-1).astype(np.int64))
        ids = [f"{split}-{i}" for i in range(len(labels))]
        height, width = arrays[f"{split}_images"].shape[1:3]
        splits[split] = ImageSet(imgs, labels, ids, ids, [(int(width), int(height))] * len(labels))
    return SourceData(names, splits["train"], splits["val"], splits["test"])


def make_synthetic(n_train: int, n_val: int, n_test: int, size: int, num_classes: int = 2, seed: int = 0) -> SourceData:
    """A learnable image set: class k carries k bright blobs over smooth noise."""
    gen = torch.Generator().manual_seed(seed)

    def make(n: int, split: str) -> ImageSet:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        coarse = torch.rand((n, 1, max(2, size // 8), max(2, size // 8)), generator=gen)
        base = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 90 + 40
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        radius = max(2.0, size / 7)
        for i in range(n):
            for _ in range(int(labels[i])):
                cy, cx = (torch.rand(2, generator=gen) * (size - 2 * radius) + radius).tolist()
                blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
                base[i, 0] += 100 * blob
        noise = torch.randn(base.shape, generator=gen) * 12
        images = (base + noise).round().clamp(0, 255).to(torch.uint8)
        ids = [f"{split}-{i}" for i in range(n)]
        return ImageSet(images, labels.long(), ids, ids)

    names = ["normal", "pneumonia"] if num_classes == 2 else [f"class{k}" for k in range(num_classes)]
    return SourceData(names, make(n_train, "train"), make(n_val, "val"), make(n_test, "test"))


SOURCES = ("synthetic", "kermany", "coronahack", "folder", "medmnist")


def build_source(cfg: Mapping[str, Any]) -> SourceData:
    """Build the source named by cfg['name'] from a plain data config mapping."""
    name = cfg.get("name")
    size = int(cfg.get("image_size", 64))
    if size < 8:
        raise ConfigError(f"data.image_size={size} is too small; use 28 or more")
    seed = int(cfg.get("seed", 0))
    if name == "synthetic":
        return make_synthetic(
            int(cfg.get("n_train", 192)),
            int(cfg.get("n_val", 64)),
            int(cfg.get("n_test", 64)),
            size,
            int(cfg.get("num_classes", 2)),
            seed,
        )
    if name == "kermany":
        if not cfg.get("root"):
            raise ConfigError("data.root is not set; pass data.root=/path/to/chest_xray")
        return load_folder_source(
            cfg["root"],
            size,
            float(cfg.get("val_fraction", 0.15)),
            seed,
            group_fn=patient_id,
            class_names=cfg.get("class_names") or ["NORMAL", "PNEUMONIA"],
            cache_dir=cfg.get("cache_dir"),
        )
    if name in ("coronahack", "folder") and not cfg.get("root"):
        raise ConfigError(f"data.root is not set; pass data.root=/path/to/your/{name} data")
    if name == "coronahack":
        from xrayfusion.data.coronahack import load_coronahack

        return load_coronahack(
            cfg["root"],
            size,
            str(cfg.get("task", "binary")),
            float(cfg.get("val_fraction", 0.15)),
            seed,
            cache_dir=cfg.get("cache_dir"),
        )
    if name == "folder":
        return load_folder_source(
            cfg["root"],
            size,
            float(cfg.get("val_fraction", 0.15)),
            seed,
            class_names=cfg.get("class_names") or None,
            cache_dir=cfg.get("cache_dir"),
        )
    if name == "medmnist":
        return load_medmnist(cfg["path"], size, cfg.get("class_names"))
    raise ConfigError(f"unknown data source data.name={name!r}; choose one of {list(SOURCES)}")
