"""The built-in sources: Kaggle-style class folders (Kermany, any folder), MedMNIST npz files, synthetic images."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.data.decode import Failure
from xrayfusion.data.imageset import ImageSet, SourceData, check_classes, decode_set
from xrayfusion.data.registry import register_source, require_root
from xrayfusion.data.splits import carve_validation, patient_id


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


@register_source("synthetic")
def _synthetic(cfg: Mapping[str, Any], size: int) -> SourceData:
    return make_synthetic(
        int(cfg.get("n_train", 192)),
        int(cfg.get("n_val", 64)),
        int(cfg.get("n_test", 64)),
        size,
        int(cfg.get("num_classes", 2)),
        int(cfg.get("seed", 0)),
    )


@register_source("kermany")
def _kermany(cfg: Mapping[str, Any], size: int) -> SourceData:
    return load_folder_source(
        require_root(cfg),
        size,
        float(cfg.get("val_fraction", 0.15)),
        int(cfg.get("seed", 0)),
        group_fn=patient_id,
        class_names=cfg.get("class_names") or ["NORMAL", "PNEUMONIA"],
        cache_dir=cfg.get("cache_dir"),
    )


@register_source("folder")
def _folder(cfg: Mapping[str, Any], size: int) -> SourceData:
    return load_folder_source(
        require_root(cfg),
        size,
        float(cfg.get("val_fraction", 0.15)),
        int(cfg.get("seed", 0)),
        class_names=cfg.get("class_names") or None,
        cache_dir=cfg.get("cache_dir"),
    )


@register_source("medmnist")
def _medmnist(cfg: Mapping[str, Any], size: int) -> SourceData:
    return load_medmnist(cfg["path"], size, cfg.get("class_names"))
