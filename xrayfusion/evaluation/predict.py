"""Predict image files with a trained ensemble: inputs -> one row per image (or per error)."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xrayfusion.core.errors import ConfigError
from xrayfusion.core.names import FUSED, predict_labels
from xrayfusion.data.decode import IMAGE_SUFFIXES, load_grey, load_grey_bytes
from xrayfusion.evaluation.inference import predict
from xrayfusion.models import FusionClassifier


def expand_inputs(spec: str) -> list[str]:
    """A file, a folder (image files below it, recursively) or a glob pattern -> sorted paths."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.exists() or not glob.has_magic(spec):
        found = [str(path)]  # a missing plain file becomes an error row, not a crash
    else:
        found = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not found:
        raise ConfigError(f"inputs={spec} matched no image files; pass a file, a folder or a glob like 'dir/*.png'")
    return found


def output_columns(model: FusionClassifier) -> list[str]:
    """Columns of a prediction frame for this model."""
    classes = list(model.hparams.class_names)
    probs = [f"{name}_prob_{cls}" for name in [FUSED, *model.keys] for cls in classes]
    return ["path", "predicted_class", *probs, "error"]


def predict_files(model: FusionClassifier, paths: Sequence[str], batch_size: int = 64) -> pd.DataFrame:
    """Fused probabilities, predicted class and each branch's probabilities per file; unreadable files get an error."""
    return predict_images_of(model, [(str(p), p) for p in paths], batch_size)


def predict_images_of(
    model: FusionClassifier, items: Sequence[tuple[str, str | bytes]], batch_size: int = 64
) -> pd.DataFrame:
    """One row per (name, source): a source is a file path or the bytes of an image file, decoded as training
    decodes files. Rows of unreadable sources carry the reason in `error` and no probabilities."""
    size = int(model.hparams.image_size)
    classes = list(model.hparams.class_names)
    arrays: list[np.ndarray] = []
    ok: list[int] = []
    rows: list[dict] = [{"path": name, "predicted_class": None, "error": None} for name, _ in items]
    for i, (_, source) in enumerate(items):
        try:
            arrays.append(load_grey_bytes(source, size) if isinstance(source, bytes) else load_grey(source, size))
            ok.append(i)
        except (ValueError, OSError) as err:
            rows[i]["error"] = str(err)
    if ok:
        images = torch.from_numpy(np.stack(arrays)[:, None])
        probs = predict(model, images, batch_size).by_model()
        predicted = predict_labels(probs[FUSED], float(model.hparams.threshold))
        for j, i in enumerate(ok):
            rows[i]["predicted_class"] = classes[int(predicted[j])]
            for name, p in probs.items():
                for c, cls in enumerate(classes):
                    rows[i][f"{name}_prob_{cls}"] = float(p[j, c])
    return pd.DataFrame(rows, columns=output_columns(model))
