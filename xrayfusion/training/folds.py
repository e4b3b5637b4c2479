"""Cross-fit folds trained with the run's own recipe: each fold is built by training.factory, like the final model.

A fold trains on K-1 folds of the training split, chooses its best epoch on the validation split, predicts
its held-out fold, and is logged as a nested MLflow run under the parent run.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.loggers import MLFlowLogger

from xrayfusion import tracking
from xrayfusion.data import SourceData, XRayDataModule
from xrayfusion.evaluation.inference import predict
from xrayfusion.evaluation.metrics import branch_aurocs
from xrayfusion.fusion import calibration
from xrayfusion.fusion.crossfit import FitPredict
from xrayfusion.training.factory import build_model, build_trainer, restore_best

log = logging.getLogger(__name__)


def fold_fit_predict(
    cfg: DictConfig,
    dm: XRayDataModule,
    parent: MLFlowLogger,
    out_dir: Path,
    n_splits: int,
    calibrate: bool,
    bf16_branches: Sequence[str],
) -> FitPredict:
    """A `fit_predict` for `crossfit.cross_fit` that trains the configured branches on each fold's training side.

    `bf16_branches` is the final model's resolved list, so folds run the same precisions without re-timing.
    """
    source = dm.prepare()
    train = source.train
    name = f"{parent.experiment.get_run(parent.run_id).info.run_name or 'run'}"

    def fit_predict(fold: int, train_idx: np.ndarray, held_idx: np.ndarray) -> torch.Tensor:
        started = time.perf_counter()
        fold_dm = XRayDataModule(dm.cfg)
        fold_dm.source = SourceData(source.class_names, train.subset(train_idx), source.val, None)
        if dm.feature_store is not None:  # the fold reads the cached features of its own training images
            fold_dm.feature_store = dm.feature_store.subset_train(train_idx)
        pl.seed_everything(int(cfg.seed) + 1 + fold, workers=True)
        model = build_model(cfg, fold_dm, bf16_branches=bf16_branches)
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
        try:
            parts = build_trainer(cfg, model, logger, ckpt_dir, ckpt_dir, enable_model_summary=False)
            parts.trainer.fit(model, datamodule=fold_dm)
            restore_best(model, parts.checkpoint)
            store = fold_dm.feature_store  # frozen branches read their cached features where the store has them
            n_views = len(model.views)
            if calibrate:
                val = predict(model, source.val, dm.batch_size, store and store.eval_features("val", n_views))
                temps = calibration.fit_temperatures(val.logits, val.labels)
                model.temperature.copy_(temps)
                tracking.log_params(logger, calibration.temperature_params(model.keys, temps))
            held_features = dm.feature_store and dm.feature_store.eval_features("train", n_views, held_idx)
            out = predict(model, held, dm.batch_size, held_features)
            aurocs = branch_aurocs(out.labels, out.probs, model.keys)
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
        return out.probs

    return fit_predict
