"""The one training recipe: the model of a config, and the Trainer with its callbacks, checkpoint IO and
best-checkpoint restore. The main run and every cross-fit fold are built here, so a fold trains exactly
like the final model."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import Logger

from xrayfusion.core.errors import ConfigError, did_you_mean
from xrayfusion.data import XRayDataModule
from xrayfusion.fusion import thresholds
from xrayfusion.models import FusionClassifier, precision
from xrayfusion.models.module import autocast_of
from xrayfusion.models.tta import DEFAULT_SCALES, parse_scales
from xrayfusion.training.callbacks import EpochHistory, FiniteLossGuard, ema_callbacks
from xrayfusion.training.checkpoints import AtomicCheckpointIO, load_checkpoint
from xrayfusion.training.config import branch_sizes_of
from xrayfusion.training.finetuning import freeze_callbacks, trained_top_stages

log = logging.getLogger(__name__)


# ---- the model ---------------------------------------------------------------------------------------------
def build_model(cfg: DictConfig, dm: XRayDataModule, bf16_branches: Sequence[str] | None = None) -> FusionClassifier:
    """The FusionClassifier of `cfg`; `bf16_branches` (a resolved list) overrides cfg.model.bf16_branches."""
    weights = dm.loss_weights()
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    configured = _bf16_branches(cfg.model.get("bf16_branches"))
    if bf16_branches is None:
        configured = _cpu_bf16_fallback(cfg, configured)
    model = FusionClassifier(
        branches=list(cfg.model.branches),
        num_classes=dm.num_classes,
        fusion=OmegaConf.to_container(cfg.fusion, resolve=True),
        in_chans=int(cfg.model.in_chans),
        image_size=int(cfg.data.image_size),
        class_names=dm.class_names,
        class_weights=weights.tolist() if weights is not None else None,
        pretrained=bool(cfg.model.pretrained),
        weights_dir=cfg.model.get("weights_dir"),
        drop_rate=float(cfg.model.drop_rate),
        threshold=thresholds.initial_threshold(cfg.metrics.threshold),
        channels_last=bool(cfg.model.get("channels_last", False)),
        compile=bool(cfg.model.get("compile", False)),
        bf16_branches=configured if bf16_branches is None else list(bf16_branches),
        autocast=autocast_of(cfg.trainer.get("precision")),  # stored: served in the precision it was tested in
        data_split=split_record(cfg, dm),
        tta=str(cfg.model.get("tta", "none")),
        tta_scales=list(parse_scales(cfg.model.get("tta_scales", DEFAULT_SCALES))),
        tta_each_epoch=bool(cfg.model.get("tta_each_epoch", True)),
        branch_sizes=branch_sizes_of(cfg.model.get("branch_sizes")),
        **input_switches(cfg.model),
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
    )
    if bf16_branches is None and configured == precision.AUTO:
        _resolve_auto_bf16(cfg, model)
    return model


def input_switches(model_cfg: DictConfig) -> dict[str, Any]:
    """The model's equalisation (model.equalize, model.clahe) and training-batch mixing (model.mixup) arguments."""
    clahe = model_cfg.get("clahe") or {}
    mixup = model_cfg.get("mixup")
    return {
        "equalize": str(model_cfg.get("equalize") or "none"),
        "clahe_clip_limit": float(clahe.get("clip_limit", 40.0)),
        "clahe_grid": [int(g) for g in clahe.get("grid", (8, 8))],
        "mixup": OmegaConf.to_container(mixup, resolve=True) if OmegaConf.is_config(mixup) else mixup,
    }


def split_record(cfg: DictConfig, dm: XRayDataModule) -> dict[str, Any]:
    """What determines the run's train/val split, stored with the model so `evaluate split=val|train` scores
    exactly the run's own split: the data seed, val_fraction and a digest of the validation file names."""
    val = dm.split("val")
    return {
        "seed": int(cfg.data.get("seed", 0)),
        "val_fraction": float(cfg.data.get("val_fraction", 0.15)),
        "val_digest": val.digest() if val is not None else None,
    }


def _bf16_branches(value: Any) -> list[str] | str:
    if value is None or isinstance(value, str):
        return value or []
    return [str(v) for v in value]


def _cpu_bf16_fallback(cfg: DictConfig, configured: list[str] | str) -> list[str] | str:
    """The bf16 branches to build: none when `falls_back_to_float32(cfg)`, with a warning; else `configured`."""
    if not falls_back_to_float32(cfg):
        return configured
    log.warning(
        "model.bf16_branches=%s: this CPU has neither AMX nor AVX512-BF16, where bf16 is emulated (about a tenth of "
        "float32's speed), so these branches train in float32 (model.bf16_fallback=float32): a slightly different "
        "network from one trained with bf16 units; model.bf16_fallback=emulate keeps bf16",
        configured if isinstance(configured, str) else "[" + ",".join(configured) + "]",
    )
    return []


def bf16_fallback(cfg: DictConfig) -> str:
    """model.bf16_fallback (float32 when unset)."""
    return str(cfg.model.get("bf16_fallback") or precision.FALLBACK_FLOAT32)


def falls_back_to_float32(cfg: DictConfig) -> bool:
    """model.bf16_fallback=float32 applies: named bf16 branches (a list or all) on a CPU run whose CPU has no bf16
    units (trainer.precision=bf16-* asks for the whole model in bf16 and is left as asked, with start_run's warning)."""
    return (
        _bf16_branches(cfg.model.get("bf16_branches")) not in ([], precision.AUTO)
        and not trainer_bf16(cfg)
        and bf16_fallback(cfg) == precision.FALLBACK_FLOAT32
        and not on_gpu(cfg.trainer.get("accelerator"))
        and precision.cpu_bf16_support() == "none"
    )


def bf16_fallback_param(cfg: DictConfig, model: FusionClassifier) -> str | None:
    """For MLflow: the named bf16 branches model.bf16_fallback=float32 put in float32 on this CPU (None: none)."""
    if not falls_back_to_float32(cfg):
        return None
    configured = _bf16_branches(cfg.model.get("bf16_branches"))
    names = list(model.hparams.branches) if configured == "all" else configured
    return f"float32 (no bf16 units on this CPU): {','.join(names)}"


def on_gpu(accelerator: str | None) -> bool:
    """Whether `trainer.accelerator` puts training on a GPU."""
    return accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())


def trainer_bf16(cfg: DictConfig) -> bool:
    """trainer.precision runs every branch in bf16 (bf16-mixed, bf16-true)."""
    return str(cfg.trainer.get("precision", "")).startswith("bf16")


def _resolve_auto_bf16(cfg: DictConfig, model: FusionClassifier) -> None:
    """model.bf16_branches=auto: time the branches, unless nothing is left to choose."""
    if trainer_bf16(cfg):
        log.info("model.bf16_branches=auto: trainer.precision=%s runs every branch in bf16", cfg.trainer.precision)
        model.set_bf16_branches([])
        return
    gpu = on_gpu(cfg.trainer.get("accelerator"))
    several = int(cfg.trainer.get("num_nodes") or 1) > 1 or cfg.trainer.get("devices", 1) not in (1, "1", "auto")
    if not gpu and several:
        log.warning(
            "model.bf16_branches=auto is not timed under CPU DDP (processes would time on shared cores and could "
            "disagree): every branch stays float32; name the branches instead, e.g. model.bf16_branches=[small_cnn]"
        )
        model.set_bf16_branches([])
        return
    precision.autotune_bf16(
        model,
        int(cfg.data.batch_size),
        int(cfg.data.image_size),
        on_gpu=gpu,
        trainable_layers=trained_top_stages(cfg.model, model),
    )


def bf16_param(cfg: DictConfig, model: FusionClassifier) -> str:
    """What runs in bf16, for MLflow: 'all (trainer.precision=...)', the branch names, or 'none'."""
    if trainer_bf16(cfg):
        return f"all (trainer.precision={cfg.trainer.precision})"
    return ",".join(model.bf16_branch_names) or "none"


# ---- the trainer -------------------------------------------------------------------------------------------
@dataclass
class TrainerParts:
    """A built Trainer and the callbacks the run reads back after fitting."""

    trainer: pl.Trainer
    checkpoint: ModelCheckpoint
    history: EpochHistory


def check_trainer_keys(trainer_cfg: Mapping[str, Any]) -> None:
    """ConfigError for a `trainer.*` key that pl.Trainer does not take, suggesting the close one."""
    accepted = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
    for key in trainer_cfg:
        if key.startswith("_") or key in accepted:
            continue
        raise ConfigError(
            f"trainer.{key} is not an argument of the Lightning Trainer"
            f"{did_you_mean(key, accepted).replace('did you mean ', 'did you mean trainer.')}; "
            "see conf/trainer/default.yaml for the usual keys"
        )


def guard_every_n_steps(cfg: DictConfig) -> int:
    """callbacks.loss_guard.every_n_steps: a number, or auto = 1 for single-process CPU training (a read-back
    costs nothing there) and 50 on GPUs or under DDP (where each read-back waits for the device or a collective)."""
    value = (cfg.callbacks.get("loss_guard") or {}).get("every_n_steps", "auto")
    if value in (None, "auto"):
        several = int(cfg.trainer.get("num_nodes") or 1) > 1 or cfg.trainer.get("devices", 1) not in (1, "1")
        return 50 if on_gpu(cfg.trainer.get("accelerator")) or several else 1
    try:
        steps = int(value)
    except (TypeError, ValueError):
        steps = 0
    if steps < 1:
        raise ConfigError(f"callbacks.loss_guard.every_n_steps={value!r} must be a number >= 1 or auto")
    return steps


def build_callbacks(
    cfg: DictConfig, model: FusionClassifier, ckpt_dir: Path, extra: Sequence[pl.Callback] = ()
) -> tuple[ModelCheckpoint, EpochHistory, list[pl.Callback]]:
    """Checkpointing, the epoch history, the LR monitor, the non-finite-loss guard, backbone freezing, the EMA
    of the weights (model.ema.enabled), (callbacks.early_stopping.enabled) early stopping, the `callbacks.extra`
    entries and `extra` (callbacks built in code, e.g. a search's pruning callback)."""
    mc = cfg.callbacks.model_checkpoint
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="epoch{epoch:03d}",
        monitor=mc.monitor,
        mode=mc.mode,
        save_last=bool(mc.save_last),
        auto_insert_metric_name=False,
    )
    history = EpochHistory()
    callbacks: list[pl.Callback] = [
        checkpoint,
        history,
        LearningRateMonitor(logging_interval="epoch"),
        FiniteLossGuard(guard_every_n_steps(cfg)),
    ]
    callbacks += freeze_callbacks(cfg.model, model)
    callbacks += ema_callbacks(cfg.model)
    es = cfg.callbacks.get("early_stopping")
    if es is not None and es.get("enabled"):
        callbacks.append(EarlyStopping(monitor=es.monitor, mode=es.mode, patience=int(es.patience)))
    for entry in (cfg.callbacks.get("extra") or {}).values():  # user callbacks: `_target_` entries
        if entry is not None:
            callbacks.append(instantiate(entry))
    callbacks += list(extra)
    return checkpoint, history, callbacks


def build_trainer(
    cfg: DictConfig,
    model: FusionClassifier,
    logger: Logger | bool,
    ckpt_dir: Path,
    root_dir: Path,
    *,
    extra_callbacks: Sequence[pl.Callback] = (),
    **overrides: Any,
) -> TrainerParts:
    """The Trainer of `cfg.trainer` with the project's callbacks (plus `extra_callbacks`) and atomic checkpoint
    writes.

    `overrides` change what a Trainer shows (e.g. enable_model_summary), never how it trains.
    """
    check_trainer_keys(cfg.trainer)
    checkpoint, history, callbacks = build_callbacks(cfg, model, ckpt_dir, extra_callbacks)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(root_dir),
        _convert_="partial",
        **overrides,
    )
    return TrainerParts(trainer, checkpoint, history)


def restore_best(model: FusionClassifier, checkpoint: ModelCheckpoint) -> bool:
    """Load the best epoch's weights (by the monitored metric) into `model`; False when none was saved."""
    if not checkpoint.best_model_path:
        return False
    model.load_state_dict(load_checkpoint(checkpoint.best_model_path)["state_dict"])
    score = checkpoint.best_model_score
    log.info(
        "restored the best epoch %s (%s=%.4f)",
        Path(checkpoint.best_model_path).name,
        checkpoint.monitor,
        float(score) if score is not None else float("nan"),
    )
    return True
