"""Kaggle's Coronahack-Chest-XRay-Dataset: a metadata CSV plus flat train/ and test/ image folders."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.data.decode import Failure
from xrayfusion.data.imageset import ImageSet, SourceData, check_classes, decode_set
from xrayfusion.data.registry import register_source, require_root
from xrayfusion.data.splits import carve_validation, patient_id

CSV_NAME = "Chest_xray_Corona_Metadata.csv"
IMAGE_DIR = "Coronahack-Chest-XRay-Dataset"
HEADER = ("", "X_ray_image_name", "Label", "Dataset_type", "Label_2_Virus_category", "Label_1_Virus_category")
TASKS = {"binary": ["normal", "pneumonia"], "three_class": ["normal", "bacterial", "viral"]}
_REQUIRED = {
    "binary": ("X_ray_image_name", "Label", "Dataset_type"),
    "three_class": ("X_ray_image_name", "Label", "Dataset_type", "Label_1_Virus_category"),
}
_PNEUMONIA = ("pnemonia", "pneumonia")  # Kaggle's CSV spells it 'Pnemonia'
_SPLITS = {"train": "train", "test": "test"}


def read_metadata(csv_path: Path, task: str) -> list[dict[str, str]]:
    """The CSV's rows; fails naming the expected and the found columns when a needed one is absent."""
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        found = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in _REQUIRED[task] if c not in found]
        if missing:
            raise DataError(
                f"{csv_path} lacks the column(s) {missing} that data.task={task} needs; expected the Coronahack "
                f"header {','.join(HEADER)}, found {','.join(found) or '(empty file)'}"
            )
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def label_of(row: dict[str, str], task: str) -> int | str:
    """The class index of a CSV row for `task`, or the reason it has none."""
    label = row["Label"].lower()
    if label == "normal":
        return 0
    if label not in _PNEUMONIA:
        return f"unknown Label {row['Label']!r} (expected Normal or Pnemonia/Pneumonia)"
    if task == "binary":
        return 1
    category = row.get("Label_1_Virus_category", "").lower()
    if category == "bacteria":
        return 1
    if category == "virus":
        return 2
    return (
        f"Label_1_Virus_category {row.get('Label_1_Virus_category', '')!r} is neither bacteria nor Virus, "
        "so the row has no three_class label"
    )


def find_image_root(root: Path) -> Path:
    """The folder holding train/ and test/: IMAGE_DIR/IMAGE_DIR (Kaggle's unzip), IMAGE_DIR, or root itself."""
    candidates = [root / IMAGE_DIR / IMAGE_DIR, root / IMAGE_DIR, root]
    for folder in candidates:
        if any(_split_dir(folder, s) is not None for s in _SPLITS):
            return folder
    found = sorted(p.name for p in root.iterdir())[:10]
    raise DataError(
        f"no train/ or test/ image folder under data.root={root}; expected {IMAGE_DIR}/{IMAGE_DIR}/{{train,test}}/ "
        f"(or {IMAGE_DIR}/{{train,test}}/) beside {CSV_NAME}, found {found}"
    )


def _split_dir(folder: Path, split: str) -> Path | None:
    if not folder.is_dir():
        return None
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == split:
            return child
    return None


def load_coronahack(
    root: str | Path,
    size: int,
    task: str = "binary",
    val_fraction: float = 0.15,
    seed: int = 0,
    group_fn: Callable[[str], str] = patient_id,
    workers: int = 2,
    cache_dir: str | Path | None = None,
) -> SourceData:
    """Train and test from the CSV's Dataset_type; validation carved out of train by patient."""
    if task not in TASKS:
        raise ConfigError(f"data.task={task!r} is unknown; choose one of {list(TASKS)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist; point it at the folder that holds {CSV_NAME}")
    csv_path = root / CSV_NAME
    if not csv_path.is_file():
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(f"data.root={root} has no {CSV_NAME}; expected it beside {IMAGE_DIR}/, found {found}")
    rows = read_metadata(csv_path, task)
    image_root = find_image_root(root)
    class_names = TASKS[task]
    skipped: list[Failure] = []
    wanted: dict[str, tuple[list[Path], list[int]]] = {s: ([], []) for s in _SPLITS}
    for row in rows:
        name, split = row["X_ray_image_name"], row["Dataset_type"].lower()
        label = label_of(row, task)
        if split not in _SPLITS:
            skipped.append(Failure(name, f"unknown Dataset_type {row['Dataset_type']!r} (expected TRAIN or TEST)"))
            continue
        split_dir = _split_dir(image_root, split) or image_root / split
        path = split_dir / name
        if isinstance(label, str):
            skipped.append(Failure(str(path), label))
        elif not name or not path.is_file():
            skipped.append(Failure(str(path), f"listed in {CSV_NAME} but the image file is absent"))
        else:
            wanted[split][0].append(path)
            wanted[split][1].append(label)
    sets: dict[str, ImageSet | None] = {}
    for split, (paths, labels) in wanted.items():
        if not paths:
            sets[split] = None
            continue
        names = [f"{split}/{p.name}" for p in paths]
        sets[split], failed = decode_set(
            paths, labels, [group_fn(p.name) for p in paths], names, size, workers, cache_dir
        )
        skipped += failed
    train, test = sets["train"], sets["test"]
    if train is None:
        raise DataError(f"{csv_path} lists no usable TRAIN image under {image_root}; {len(skipped)} row(s) skipped")
    check_classes("train", train, class_names, str(root))
    train_idx, val_idx = carve_validation(train.labels.tolist(), train.groups, val_fraction, seed)
    train, val = train.subset(train_idx), train.subset(val_idx)
    check_classes("val", val, class_names, str(root))
    return SourceData(list(class_names), train, val, test, skipped)


@register_source("coronahack")
def _coronahack(cfg: Mapping[str, Any], size: int) -> SourceData:
    return load_coronahack(
        require_root(cfg),
        size,
        str(cfg.get("task", "binary")),
        float(cfg.get("val_fraction", 0.15)),
        int(cfg.get("seed", 0)),
        cache_dir=cfg.get("cache_dir"),
    )
