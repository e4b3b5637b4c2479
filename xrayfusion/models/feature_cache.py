"""Frozen branches compute their pooled features once (model.feature_cache=true).

A branch frozen for the whole run (pretrained, with model.trainable_layers=0 or frozen for every epoch) gives
the same pooled features for an image in every epoch, so running its backbone on every step is wasted work.
`build_store` computes those features for every train and validation image once, keeps them on disk next to
the decode cache (one file per branch, named by a key of everything the features depend on: backbone, weights
file, input size, precision, preprocessing, the images themselves, the augmented views), and training then
reads them: only the heads, the fusion and the trainable branches run per step.

Augmentation: features of randomly augmented images cannot be computed once. `views=0` caches the
un-augmented images (the cached branches then train without augmentation; the run logs it), `views=K` caches
K augmented views per training image, drawn once with a fixed seed, and each step picks one per image at
random. Validation features are those of the un-augmented images in every test-time view (models/tta.py: the
image, its mirror, its rescaled copies).

The checkpoint holds the whole model: evaluate, predict and the served model run the backbones live and never
need the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from xrayfusion.core.modes import eval_mode
from xrayfusion.data import ImageSet
from xrayfusion.models.module import FusionClassifier
from xrayfusion.models.tta import PLAIN, View

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a cache file holds changes
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


@dataclass
class FeatureStore:
    """Cached pooled features by branch key: `train[key]` (V, N, D) with V augmented views (1: un-augmented),
    `val[key]` (T, N, D) with one row per test-time view (`model.views`: 1 without tta, the plain image first).
    Rows follow the ImageSets' order; a loader that yields (image, label, index) batches looks features up by
    index."""

    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    needs_images: bool  # False when every branch is cached: loaders then skip decoding and augmenting
    train_augmented: bool = False  # the training rows are augmented views (model.feature_cache_views > 0)

    def lookup(self, split: str, index: torch.Tensor, device: torch.device) -> tuple[dict, list[dict] | None]:
        """(features, features of the other test-time views or None) of the images at `index` of `split`
        ('train' or 'val').

        Training draws one of the V views per image (torch's global generator, so a seeded run repeats);
        with one view nothing is drawn."""
        index = index.cpu().long()
        if split == "train":  # one row per image: view 0, or one of the V augmented views drawn per image
            drawn = {
                k: v[torch.randint(v.shape[0], (len(index),)) if v.shape[0] > 1 else 0, index]
                for k, v in self.train.items()
            }
            return {k: v.to(device, non_blocking=True) for k, v in drawn.items()}, None
        return split_views({k: v[:, index] for k, v in self.val.items()}, device)

    def eval_features(
        self, split: str, n_views: int, index: Sequence[int] | np.ndarray | None = None
    ) -> dict[str, torch.Tensor] | None:
        """Features for an eval-mode prediction (evaluation.inference.predict) of the `split` images at `index`
        (all when None), (T, n, D) per cached branch with T = `n_views` test-time views; None when the store
        does not hold them: training images cached as augmented views (their un-augmented features are not
        stored) or with fewer views than the model's test-time augmentation needs."""
        table = self.train if split == "train" else self.val
        if not table or any(v.shape[0] != n_views for v in table.values()):
            return None
        if split == "train" and self.train_augmented:
            return None
        if index is None:
            return dict(table)
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return {k: v[:, rows] for k, v in table.items()}

    def subset_train(self, index: Sequence[int]) -> FeatureStore:
        """The store of a cross-fit fold trained on the training images at `index` (validation unchanged)."""
        rows = torch.as_tensor(list(index), dtype=torch.long)
        train = {k: v[:, rows] for k, v in self.train.items()}
        return FeatureStore(train, self.val, self.needs_images, self.train_augmented)


def split_views(
    rows: Mapping[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """(T, n, D) cached rows per branch key -> (those of the plain view, those of each other test-time view or
    None), on `device`: what `FusionClassifier.forward` takes as `features` and `view_features`."""
    views = next(iter(rows.values())).shape[0] if rows else 1
    by_view = [{k: v[t].to(device, non_blocking=True) for k, v in rows.items()} for t in range(views)]
    return by_view[0], by_view[1:] or None


# ---- keys --------------------------------------------------------------------------------------------------
def images_digest(images: ImageSet) -> str:
    """A digest of the decoded pixels and labels in their order (what the features' rows are of)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(images.images.shape)).encode())
    h.update(images.images.contiguous().numpy().tobytes())
    h.update(images.labels.numpy().tobytes())
    return h.hexdigest()


def _weights_digest(source: str | None) -> str:
    """md5 of a weights file (memoised by path, size and mtime), or the source text when it is not a file."""
    if not source:
        return "none"
    path = Path(source.split(" (")[-1].rstrip(")")) if " (" in source else Path(source)
    if not path.is_file():
        return source
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.md5()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def cache_key(
    model: FusionClassifier,
    branch: int,
    digests: Mapping[str, str],
    views: int,
    augment: Any,
    seed: int,
) -> dict[str, Any]:
    """Everything branch `branch`'s cached features depend on, as a JSON-able mapping."""
    key = model.keys[branch]
    hp = model.hparams
    return {
        "format": FORMAT,
        "backbone": str(hp.branches[branch]),
        "weights": _weights_digest(model.weights_sources.get(key)),
        "in_chans": int(hp.in_chans),
        "decode_size": int(hp.image_size),
        "input_size": int(model.sizes[branch]),
        "precision": {"branch_bf16": key in model.bf16_keys, "autocast": hp.get("autocast")},
        "normalise": [model.mean[branch].flatten().tolist(), model.std[branch].flatten().tolist()],
        "equalize": hp.get("equalize"),
        # CLAHE's settings change the features too (absent for other modes: their keys stay what they were)
        **(
            {"clahe": [float(hp.get("clahe_clip_limit", 40.0)), list(hp.get("clahe_grid", (8, 8)))]}
            if hp.get("equalize") == "clahe"
            else {}
        ),
        # the test-time views of the validation rows; with no scales as before tta=scales existed (files stay valid)
        "tta": str(hp.get("tta", "none"))
        if all(v.scale == 1.0 for v in model.views)
        else [[v.flip, v.scale] for v in model.views],
        "drop_rate": float(hp.get("drop_rate", 0.0)),
        "data": dict(digests),
        "views": int(views),
        "augment": repr(augment) if views else None,
        "seed": int(seed) if views else None,
    }


def key_name(backbone: str, key: Mapping[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, default=str)
    return f"{backbone}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"


# ---- computing ---------------------------------------------------------------------------------------------
def _features(
    model: FusionClassifier, branch: int, images: torch.Tensor, batch_size: int, view: View = PLAIN
) -> torch.Tensor:
    """(N, D) float32 pooled features of uint8 images in test-time `view`, backbone in eval mode, under the
    model's precisions."""
    out = []
    with torch.no_grad(), eval_mode(model), model._model_autocast(model.device):
        for start in range(0, len(images), batch_size):
            x = view.apply(images[start : start + batch_size].to(model.device))
            out.append(model.branch_features(x, branch, None, view).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def _augmented(images: torch.Tensor, augment: Callable, seed: int) -> torch.Tensor:
    """One augmented copy of every image, drawn from a generator seeded by `seed` (the global one untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([augment(img) for img in images])


def compute(
    model: FusionClassifier,
    branch: int,
    train: ImageSet,
    val: ImageSet,
    views: int,
    augment: v2.Transform | None,
    seed: int,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """{'train': (V, N, D), 'val': (T, N, D)} features of branch `branch` (see FeatureStore)."""
    if views and augment is not None:
        train_views = [
            _features(model, branch, _augmented(train.images, augment, seed + v), batch_size) for v in range(views)
        ]
    else:
        train_views = [_features(model, branch, train.images, batch_size)]
    val_views = [_features(model, branch, val.images, batch_size, view) for view in model.views]
    return {"train": torch.stack(train_views), "val": torch.stack(val_views)}


def _read(path: Path, key: Mapping[str, Any], n_train: int, n_val: int) -> dict[str, torch.Tensor] | None:
    """The cached features at `path`, or None for a miss: no file, a damaged one, or one of another key."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            json.loads(saved["key"]) == json.loads(json.dumps(key, sort_keys=True, default=str))
            and saved["train"].shape[1] == n_train
            and saved["val"].shape[1] == n_val
        )
    except Exception as err:  # truncated, not a torch file, wrong layout
        log.warning("feature cache file %s is damaged (%s): computing the features again", path, err)
        return None
    if not ok:
        log.warning("feature cache file %s does not match its key: computing the features again", path)
        return None
    return {"train": saved["train"], "val": saved["val"]}


def _write(path: Path, key: Mapping[str, Any], feats: Mapping[str, torch.Tensor]) -> None:
    """Write atomically (a temporary file renamed into place), so a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        payload = {"key": json.dumps(key, sort_keys=True, default=str), **feats}
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the decode cache beside it is readable by the group too
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass
class CacheReport:
    """What `build_store` did, for the run's log and MLflow params."""

    hits: list[str]
    misses: list[str]
    files: dict[str, str]
    seconds: float


def build_store(
    model: FusionClassifier,
    cached_keys: Sequence[str],
    train: ImageSet,
    val: ImageSet,
    cache_dir: str | Path | None,
    views: int = 0,
    augment: v2.Transform | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[FeatureStore, CacheReport]:
    """Features of the branches `cached_keys` for `train` and `val`, read from `cache_dir/features/` when a file
    of the same key is there, else computed (and written there; `cache_dir=None` keeps them in memory only)."""
    started = time.perf_counter()
    digests = {"train": images_digest(train), "val": images_digest(val)}
    augmented = bool(views) and augment is not None  # as `compute` draws them
    store = FeatureStore({}, {}, needs_images=len(cached_keys) < len(model.keys), train_augmented=augmented)
    hits, misses, files = [], [], {}
    for key in cached_keys:
        branch = model.keys.index(key)
        spec = cache_key(model, branch, digests, views, augment, seed)
        path = Path(cache_dir) / "features" / key_name(spec["backbone"], spec) if cache_dir else None
        feats = _read(path, spec, len(train), len(val)) if path else None
        if feats is None:
            misses.append(key)
            feats = compute(model, branch, train, val, views, augment, seed, batch_size)
            if path:
                _write(path, spec, feats)
        else:
            hits.append(key)
        if path:
            files[key] = str(path)
        store.train[key], store.val[key] = feats["train"], feats["val"]
    report = CacheReport(hits, misses, files, time.perf_counter() - started)
    log.info(
        "feature cache: %s read, %s computed (%.1fs)%s",
        hits or "none",
        misses or "none",
        report.seconds,
        f" in {Path(cache_dir) / 'features'}" if cache_dir else " (in memory: data.cache_dir is null)",
    )
    return store, report
