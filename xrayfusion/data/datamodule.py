"""The LightningDataModule: one source, decoded once, served as uint8 tensors."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from xrayfusion.core.distributed import eval_sampler
from xrayfusion.core.errors import ConfigError
from xrayfusion.core.runtime import resolve_workers
from xrayfusion.data.imageset import ImageSet, SourceData
from xrayfusion.data.registry import build_source
from xrayfusion.data.skipped import check_strict, skipped_summary
from xrayfusion.data.transforms import TensorDataset, build_augment

log = logging.getLogger(__name__)

BALANCE_MODES = ("none", "weights", "sampler")


class XRayDataModule(pl.LightningDataModule):
    """Serves train/val/test loaders of a source built from a plain data config mapping."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)
        self.balance = str(self.cfg.get("balance", "none"))
        if self.balance not in BALANCE_MODES:
            raise ConfigError(f"data.balance={self.balance!r} is unknown; choose one of {list(BALANCE_MODES)}")
        self.batch_size = int(self.cfg.get("batch_size", 32))
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size={self.batch_size} must be a positive integer, e.g. 32")
        self.num_workers = resolve_workers(self.cfg.get("num_workers", 0))
        self.augment = build_augment(self.cfg.get("augment"))
        self.source: SourceData | None = None
        # cached features of frozen branches (models/feature_cache.FeatureStore), set by the train run: the train
        # and val loaders then yield (image, label, index) batches the model looks features up with
        self.feature_store: Any = None

    def prepare(self) -> SourceData:
        """Decode the source once (idempotent); returns it."""
        if self.source is None:
            source = build_source(self.cfg)
            check_strict(source.skipped, bool(self.cfg.get("strict", False)))
            self.source = source
            log.info("classes (label order): %s", {i: c for i, c in enumerate(source.class_names)})
            for split in ("train", "val", "test"):
                s = getattr(self.source, split)
                if s is not None:
                    log.info("%s: %d images, class counts %s", split, len(s), s.class_counts(self.num_classes))
            if self.source.skipped:
                log.warning("%s (data.strict=true makes this an error)", skipped_summary(self.source.skipped))
        return self.source

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def class_names(self) -> list[str]:
        return self.prepare().class_names

    @property
    def num_classes(self) -> int:
        return len(self.prepare().class_names)

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights of the train split (mean 1)."""
        counts = torch.tensor(self.prepare().train.class_counts(self.num_classes), dtype=torch.float)
        return counts.sum() / (counts.clamp(min=1) * len(counts))

    def loss_weights(self) -> torch.Tensor | None:
        return self.class_weights() if self.balance == "weights" else None

    def split(self, name: str) -> ImageSet | None:
        return getattr(self.prepare(), name)

    def _loader(self, split: ImageSet, train: bool, distributed: bool = False, indexed: bool = False) -> DataLoader:
        store = self.feature_store if indexed else None
        dataset = TensorDataset(
            split.images,
            split.labels,
            self.augment if train else None,
            with_index=store is not None,
            images_needed=store is None or store.needs_images,
        )
        sampler = None if train or not distributed else eval_sampler(dataset, self.trainer)
        if train and self.balance == "sampler":
            per_sample = self.class_weights()[split.labels]
            sampler = WeightedRandomSampler(per_sample, num_samples=len(split), replacement=True)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=train and len(split) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.prepare().train, train=True, indexed=True)

    def val_dataloader(self) -> DataLoader:
        val = self.prepare().val
        if val is None:
            raise ConfigError("the data source has no validation split; set data.val_fraction")
        return self._loader(val, train=False, distributed=True, indexed=True)

    def test_dataloader(self) -> DataLoader:
        test = self.prepare().test
        if test is None:
            raise ConfigError("the data source has no test split; run with test=false")
        return self._loader(test, train=False, distributed=True)

    def loader(self, split: str) -> DataLoader:
        """An un-augmented, unshuffled loader of any split (for predictions)."""
        data = self.split(split)
        if data is None:
            raise ConfigError(f"the data source has no {split} split")
        return self._loader(data, train=False)
