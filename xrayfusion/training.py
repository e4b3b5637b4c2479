"""The train task: config -> data, model, trainer, MLflow run -> fit, fit fusion, test, log."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from xrayfusion import config as config_checks
from xrayfusion import fusion_fit, plots, reports, resilience, runtime, sweep, thresholds, tracking
from xrayfusion.callbacks import EpochHistory
from xrayfusion.checkpoints import AtomicCheckpointIO
from xrayfusion.data import XRayDataModule
from xrayfusion.data.skipped import write_skipped_csv
from xrayfusion.finetuning import freeze_callbacks
from xrayfusion.metrics import predict_labels
from xrayfusion.models import FusionClassifier, precision

log = logging.getLogger(__name__)


def run_name(cfg: DictConfig) -> str:
    return cfg.logger.get("run_name") or f"{cfg.fusion.name}:{'+'.join(cfg.model.branches)}"


def build_model(cfg: DictConfig, dm: XRayDataModule, bf16_branches: Sequence[str] | None = None) -> FusionClassifier:
    """The FusionClassifier of `cfg`; `bf16_branches` (a resolved list) overrides cfg.model.bf16_branches."""
    weights = dm.loss_weights()
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    configured = _bf16_branches(cfg.model.get("bf16_branches"))
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
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
    )
    if bf16_branches is None and configured == precision.AUTO:
        _resolve_auto_bf16(cfg, model)
    return model


def _bf16_branches(value: Any) -> list[str] | str:
    if value is None or isinstance(value, str):
        return value or []
    return [str(v) for v in value]


def _on_gpu(accelerator: str | None) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())


def _trainer_bf16(cfg: DictConfig) -> bool:
    return str(cfg.trainer.get("precision", "")).startswith("bf16")


def _resolve_auto_bf16(cfg: DictConfig, model: FusionClassifier) -> None:
    """model.bf16_branches=auto: time the branches, unless nothing is left to choose."""
    if _trainer_bf16(cfg):
        log.info("model.bf16_branches=auto: trainer.precision=%s runs every branch in bf16", cfg.trainer.precision)
        model.set_bf16_branches([])
        return
    on_gpu = _on_gpu(cfg.trainer.get("accelerator"))
    several = int(cfg.trainer.get("num_nodes") or 1) > 1 or cfg.trainer.get("devices", 1) not in (1, "1", "auto")
    if not on_gpu and several:
        log.warning(
            "model.bf16_branches=auto is not timed under CPU DDP (processes would time on shared cores and could "
            "disagree): every branch stays float32; name the branches instead, e.g. model.bf16_branches=[small_cnn]"
        )
        model.set_bf16_branches([])
        return
    precision.autotune_bf16(model, int(cfg.data.batch_size), int(cfg.data.image_size), on_gpu=on_gpu)


def bf16_param(cfg: DictConfig, model: FusionClassifier) -> str:
    """What runs in bf16, for MLflow: 'all (trainer.precision=...)', the branch names, or 'none'."""
    if _trainer_bf16(cfg):
        return f"all (trainer.precision={cfg.trainer.precision})"
    return ",".join(model.bf16_branch_names) or "none"


def _callbacks(cfg: DictConfig, ckpt_dir: Path) -> tuple[ModelCheckpoint, EpochHistory, list[pl.Callback]]:
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
        resilience.FiniteLossGuard(),
    ]
    es = cfg.callbacks.get("early_stopping")
    if es is not None and es.get("enabled"):
        callbacks.append(EarlyStopping(monitor=es.monitor, mode=es.mode, patience=int(es.patience)))
    return checkpoint, history, callbacks


def _log_figure(logger: Any, fig: Any, out_dir: Path, name: str) -> None:
    if rank_zero_only.rank == 0:  # under DDP every process plots; one writes and logs
        path = out_dir / name
        fig.savefig(path, dpi=110)
        tracking.log_artifact(logger, path, "plots")
    plots.plt.close(fig)


def train(cfg: DictConfig) -> float | None:
    """Run one training; returns the best value of `optimized_metric` (None when never validated)."""
    config_checks.validate(cfg)
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    tracking.prepare_store(uri)  # an unreachable tracking server fails here, before any data is read
    resume = resilience.find_resume(uri, str(cfg.resume_run_id)) if cfg.get("resume_run_id") else None
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    runtime.configure_torch(**(OmegaConf.to_container(cfg.runtime) if cfg.get("runtime") else {}))
    if cfg.model.get("bf16_branches") not in (None, [], precision.AUTO) or _trainer_bf16(cfg):
        runtime.warn_slow_cpu_bf16(str(cfg.trainer.get("accelerator", "auto")))

    dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    source = dm.prepare()
    resumed_bf16 = None
    if resume and resume.checkpoint and cfg.model.get("bf16_branches") == precision.AUTO:
        # the resumed run keeps the precisions its first part measured (no new timing, no param mismatch)
        resumed_bf16 = resilience.checkpoint_hparams(resume.checkpoint).get("bf16_branches") or []
    model = build_model(cfg, dm, bf16_branches=resumed_bf16)

    tags = {"fusion": str(cfg.fusion.name), "branches": ",".join(cfg.model.branches), "data": str(cfg.data.name)}
    tags.update(sweep.sweep_tags(cfg.logger.get("sweep_id"), cfg.logger.get("sweep_job")))
    logger = tracking.create_logger(
        cfg.logger, run_name(cfg), {**tags, **(cfg.logger.get("tags") or {})}, run_id=resume and resume.run_id
    )
    ckpt_dir = resume.checkpoint_dir if resume else (out_dir / "checkpoints").resolve()
    tracking.set_tags(logger, {resilience.CHECKPOINT_DIR_TAG: ckpt_dir})
    if resume:
        tracking.set_status(logger, "RUNNING")
    log.info("MLflow run %s (experiment %s)", logger.run_id, logger.experiment_id)
    tracking.log_params(  # one call: what the data turned out to hold wins over the config's data/class_names
        logger,
        {
            **OmegaConf.to_container(cfg, resolve=True),
            "data/class_names": ",".join(source.class_names),
            "data/num_classes": len(source.class_names),
            **{f"data/n_{s}": len(getattr(source, s)) for s in ("train", "val", "test") if getattr(source, s)},
            # the branches that run in bf16 autocast (model.bf16_branches=auto resolved by measurement)
            "precision/bf16_branches": bf16_param(cfg, model),
        },
    )
    logger.log_metrics({"data/skipped": len(source.skipped)})
    if source.skipped:
        tracking.log_artifact(logger, write_skipped_csv(source.skipped, out_dir / "skipped_files.csv"))
    config_path = out_dir / "config.yaml"
    OmegaConf.save(cfg, config_path, resolve=True)
    tracking.log_artifact(logger, config_path)

    checkpoint, history, callbacks = _callbacks(cfg, ckpt_dir)
    callbacks += freeze_callbacks(cfg.model, model)
    tracking.log_params(logger, {f"weights/{k}": v or "none" for k, v in model.weights_sources.items()})
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(out_dir),
        _convert_="partial",
    )
    try:
        started = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=resume and resume.checkpoint, weights_only=True)
        fit_seconds = time.perf_counter() - started
        if checkpoint.best_model_path:
            state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["state_dict"])
            log.info(
                "restored best checkpoint %s (%s=%s)",
                checkpoint.best_model_path,
                checkpoint.monitor,
                checkpoint.best_model_score,
            )
        fold_builder = functools.partial(
            build_model, bf16_branches=model.bf16_branch_names
        )  # folds: the same precisions
        fusion_fit.fit_fusion(cfg, model, dm, logger, out_dir, fold_builder)  # calibration, fusion fit, thresholds
        final_ckpt = out_dir / "checkpoints" / "best.ckpt"
        trainer.save_checkpoint(final_ckpt, weights_only=True)
        tracking.log_artifact(logger, final_ckpt, "checkpoints")
        if cfg.tracking.log_model and rank_zero_only.rank == 0:
            uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
            reports.log_model(uri, logger.run_id, final_ckpt, cfg.tracking.get("register_as"))
        logger.log_metrics({"time/fit_seconds": fit_seconds})

        if cfg.get("test", True) and source.test is not None:
            trainer.test(model, datamodule=dm, verbose=False)
            outs = model.test_outputs
            names = [*model.keys, "fused"]
            probs_by_model = {k: outs["probs"][:, i] for i, k in enumerate(model.keys)}
            probs_by_model["fused"] = outs["fused_probs"]
            predicted = predict_labels(outs["fused_probs"], float(model.hparams.threshold))
            _log_figure(
                logger,
                plots.confusion_matrix_figure(outs["labels"], predicted, source.class_names),
                out_dir,
                "confusion_matrix_test.png",
            )
            _log_figure(logger, plots.roc_figure(outs["labels"], probs_by_model), out_dir, "roc_test.png")
            if rank_zero_only.rank == 0:  # under DDP: rank zero's share of the test set
                reports.log_test_report(
                    logger,
                    model,
                    source.test,
                    outs,
                    out_dir,
                    int(cfg.metrics.bootstrap),
                    int(cfg.seed),
                    int(cfg.gradcam.n_images),
                )
            summary = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            log.info("test: %s", {n: round(float(summary.get(f"test/{n}/auroc", float("nan"))), 4) for n in names})
        if history.history:
            _log_figure(logger, plots.training_curves_figure(history.history), out_dir, "training_curves.png")
    except BaseException as err:
        tracking.set_tags(logger, {resilience.FAILURE_TAG: resilience.failure_reason(err)})
        tracking.set_status(logger, "FAILED")
        raise
    score = checkpoint.best_model_score
    logger.log_metrics(sweep.best_metric(str(cfg.optimized_metric), None if score is None else float(score)))
    tracking.set_status(logger, "FINISHED")
    return float(score) if score is not None else None
