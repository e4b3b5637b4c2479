"""Cross-fitting: out-of-fold branch probabilities for every training image (StackingClassifier semantics).

`cross_fit` is the pure part: patient-grouped, class-stratified folds, one `fit_predict` call per fold, each
held-out fold predicted by a model that never saw it. `fold_fit_predict` trains the real branches for a fold
(train on K-1 folds, choose the best epoch on the validation split, predict the held-out fold) and logs the
fold as a nested MLflow run under the parent run.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from xrayfusion import calibration, tracking
from xrayfusion.data import XRayDataModule
from xrayfusion.data.sources import ImageSet, SourceData
from xrayfusion.data.splits import grouped_folds
from xrayfusion.data.transforms import TensorDataset
from xrayfusion.errors import ConfigError

log = logging.getLogger(__name__)

FitPredict = Callable[[int, np.ndarray, np.ndarray], torch.Tensor]


def parse_cv(value: Any) -> int | None:
    """fusion.cv: 'holdout' (or null) -> None; an integer K >= 2 -> K."""
    if value is None or str(value).strip().lower() == "holdout":
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 2 or str(k) != str(value).strip():
        raise ConfigError(f"fusion.cv={value!r} must be 'holdout' or a number of folds >= 2, e.g. fusion.cv=5")
    return k


def cross_fit(
    labels: Sequence[int], groups: Sequence[str], n_splits: int, seed: int, fit_predict: FitPredict
) -> tuple[torch.Tensor, np.ndarray]:
    """Out-of-fold predictions (N, ...) and the fold of each row.

    `fit_predict(fold, train_idx, held_out_idx)` must fit on train_idx only and return predictions for
    held_out_idx. Raises RuntimeError if a fold's two sides share an image or a patient.
    """
    labels = np.asarray(labels)
    groups = list(groups)
    oof: torch.Tensor | None = None
    fold_of = np.full(len(labels), -1)
    for fold, (train_idx, held_idx) in enumerate(grouped_folds(labels, groups, n_splits, seed)):
        shared = {groups[i] for i in train_idx} & {groups[i] for i in held_idx}
        if set(train_idx.tolist()) & set(held_idx.tolist()) or shared:
            raise RuntimeError(f"fold {fold}: training and held-out sides share patients {sorted(shared)[:5]}")
        pred = fit_predict(fold, train_idx, held_idx)
        if oof is None:
            oof = torch.zeros((len(labels), *pred.shape[1:]), dtype=pred.dtype)
        oof[torch.as_tensor(held_idx)] = pred
        fold_of[held_idx] = fold
    if oof is None or (fold_of < 0).any():
        raise RuntimeError("cross-fitting left images without an out-of-fold prediction")
    return oof, fold_of


def image_loader(images: ImageSet, batch_size: int) -> DataLoader:
    """An unshuffled, un-augmented loader over an ImageSet."""
    return DataLoader(TensorDataset(images.images, images.labels, None), batch_size=batch_size, shuffle=False)


@torch.no_grad()
def collect(model: Any, loader: DataLoader) -> dict[str, torch.Tensor]:
    """Raw branch logits (N, K, C), branch probabilities (temperature applied), fused probabilities, labels."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "probs": [], "fused_probs": [], "labels": []}
    for x, y in loader:
        out = model(x.to(model.device))
        for key in ("logits", "probs", "fused_probs"):
            parts[key].append(out[key].float().cpu())
        parts["labels"].append(y.cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def _auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    if len(torch.unique(labels)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(binary_auroc(probs[:, 1], labels))
    return float(multiclass_auroc(probs, labels, num_classes=probs.shape[1]))


def fold_fit_predict(
    cfg: DictConfig,
    dm: XRayDataModule,
    build_model: Callable[[DictConfig, XRayDataModule], Any],
    parent: MLFlowLogger,
    out_dir: Path,
    n_splits: int,
    calibrate: bool,
) -> FitPredict:
    """A `fit_predict` for `cross_fit` that trains the configured branches on each fold's training side."""
    source = dm.prepare()
    train = source.train
    name = f"{parent.experiment.get_run(parent.run_id).info.run_name or 'run'}"

    def fit_predict(fold: int, train_idx: np.ndarray, held_idx: np.ndarray) -> torch.Tensor:
        started = time.perf_counter()
        fold_dm = XRayDataModule(dm.cfg)
        fold_dm.source = SourceData(source.class_names, train.subset(train_idx), source.val, None)
        pl.seed_everything(int(cfg.seed) + 1 + fold, workers=True)
        model = build_model(cfg, fold_dm)
        tags = {"mlflow.parentRunId": parent.run_id, "fold": str(fold + 1), "fusion": str(cfg.fusion.name)}
        logger = tracking.create_logger(cfg.logger, f"{name}/fold{fold + 1}", tags)
        held = train.subset(held_idx)
        tracking.log_params(
            logger,
            {
                "fold/index": fold + 1,
                "fold/n_folds": n_splits,
                "fold/n_train": len(train_idx),
                "fold/n_heldout": len(held_idx),
                "fold/heldout_patients": len(set(held.groups)),
            },
        )
        ckpt_dir = out_dir / "folds" / f"fold{fold + 1}"
        mc = cfg.callbacks.model_checkpoint
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor=mc.monitor, mode=mc.mode, save_last=False)
        trainer: pl.Trainer = instantiate(
            cfg.trainer,
            logger=logger,
            callbacks=[checkpoint],
            default_root_dir=str(ckpt_dir),
            enable_model_summary=False,
            _convert_="partial",
        )
        try:
            trainer.fit(model, datamodule=fold_dm)
            if checkpoint.best_model_path:
                state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
                model.load_state_dict(state["state_dict"])
            if calibrate:
                val = collect(model, image_loader(source.val, dm.batch_size))
                temps = calibration.fit_temperatures(val["logits"], val["labels"])
                model.temperature.copy_(temps)
                tracking.log_params(logger, calibration.temperature_params(model.keys, temps))
            out = collect(model, image_loader(held, dm.batch_size))
            aurocs = {k: _auroc(out["probs"][:, i], out["labels"]) for i, k in enumerate(model.keys)}
            logger.log_metrics({f"oof/{k}/auroc": v for k, v in aurocs.items()})
        except BaseException:
            tracking.set_status(logger, "FAILED")
            raise
        tracking.set_status(logger, "FINISHED")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        log.info(
            "fold %d/%d: trained on %d images, predicted %d held-out images (%d patients) in %.1fs; held-out auroc %s",
            fold + 1,
            n_splits,
            len(train_idx),
            len(held_idx),
            len(set(held.groups)),
            time.perf_counter() - started,
            {k: round(v, 4) for k, v in aurocs.items()},
        )
        return out["probs"]

    return fit_predict
