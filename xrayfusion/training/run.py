"""The train task as named phases: start the run, fit, fit the fusion, test and report, finish.

`run_status` marks the MLflow run FINISHED, or FAILED with the reason tag whatever fails after the run
exists (building the trainer included), or KILLED when the caller's `stops` exception ended it on purpose
(a pruned search trial).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from xrayfusion import tracking
from xrayfusion.core import runtime
from xrayfusion.core.errors import ConfigError
from xrayfusion.core.names import (
    FIT_SECONDS,
    FUSED,
    FUSED_VAL_AUROC,
    SELECTION_CI,
    SELECTION_METRIC,
    SELECTION_MODE,
    SELECTION_SOURCE,
)
from xrayfusion.data import SourceData, XRayDataModule
from xrayfusion.data.skipped import write_skipped_csv
from xrayfusion.evaluation import plots
from xrayfusion.evaluation.pyfunc import log_pyfunc_model
from xrayfusion.evaluation.report import log_figure, log_test_report
from xrayfusion.models import FusionClassifier, precision
from xrayfusion.models.backbones import below_top
from xrayfusion.models.feature_cache import build_store
from xrayfusion.training import resume as resuming
from xrayfusion.training import sweep
from xrayfusion.training.config import validate
from xrayfusion.training.factory import (
    TrainerParts,
    bf16_fallback,
    bf16_fallback_param,
    bf16_param,
    build_model,
    build_trainer,
    restore_best,
    trainer_bf16,
)
from xrayfusion.training.finetuning import frozen_for_whole_run, trained_top_stages
from xrayfusion.training.fusion_phase import FusionOutcome, fit_fusion

log = logging.getLogger(__name__)

FINAL_CHECKPOINT = "best.ckpt"


@dataclass
class Run:
    """What the phases share: the config, data, model, MLflow logger and where files go."""

    cfg: DictConfig
    dm: XRayDataModule
    source: SourceData
    model: FusionClassifier
    logger: MLFlowLogger
    out_dir: Path
    ckpt_dir: Path
    resume: resuming.Resume | None
    test_results: pd.DataFrame | None = None
    fusion: FusionOutcome | None = None  # set by the fusion phase


def run_name(cfg: DictConfig) -> str:
    return cfg.logger.get("run_name") or f"{cfg.fusion.name}:{'+'.join(cfg.model.branches)}"


@contextmanager
def run_status(logger: MLFlowLogger, stops: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """FINISHED when the block completes; KILLED with the `xrayfusion.stop_reason` tag when it raises one of
    `stops` (a stop on purpose); FAILED with the `xrayfusion.failure_reason` tag when it raises anything else."""
    try:
        yield
    except stops as err:
        tracking.set_tags(logger, {resuming.STOP_TAG: resuming.failure_reason(err)})
        tracking.set_status(logger, "KILLED")
        raise
    except BaseException as err:
        tracking.set_tags(logger, {resuming.FAILURE_TAG: resuming.failure_reason(err)})
        tracking.set_status(logger, "FAILED")
        raise
    tracking.set_status(logger, "FINISHED")


# ---- phases ------------------------------------------------------------------------------------------------
def start_run(cfg: DictConfig) -> Run:
    """Check the config, reach the store, read the data, build the model, open (or reopen) the MLflow run."""
    validate(cfg)
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    tracking.prepare_store(uri)  # an unreachable tracking server fails here, before any data is read
    resume = resuming.find_resume(uri, str(cfg.resume_run_id)) if cfg.get("resume_run_id") else None
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    runtime.configure_torch(**(OmegaConf.to_container(cfg.runtime) if cfg.get("runtime") else {}))
    named_bf16 = cfg.model.get("bf16_branches") not in (None, [], precision.AUTO)
    if trainer_bf16(cfg) or (named_bf16 and bf16_fallback(cfg) == precision.FALLBACK_EMULATE):
        runtime.warn_slow_cpu_bf16(str(cfg.trainer.get("accelerator", "auto")))

    dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    source = dm.prepare()
    resumed_bf16 = None
    if resume and resume.checkpoint and cfg.model.get("bf16_branches") == precision.AUTO:
        # the resumed run keeps the precisions its first part measured (no new timing, no param mismatch)
        resumed_bf16 = resuming.checkpoint_hparams(resume.checkpoint).get("bf16_branches") or []
    model = build_model(cfg, dm, bf16_branches=resumed_bf16)

    tags = {"fusion": str(cfg.fusion.name), "branches": ",".join(cfg.model.branches), "data": str(cfg.data.name)}
    tags.update(sweep.sweep_tags(cfg.logger.get("sweep_id"), cfg.logger.get("sweep_job")))
    logger = tracking.create_logger(
        cfg.logger, run_name(cfg), {**tags, **(cfg.logger.get("tags") or {})}, run_id=resume and resume.run_id
    )
    ckpt_dir = resume.checkpoint_dir if resume else (out_dir / "checkpoints").resolve()
    tracking.set_tags(logger, {resuming.CHECKPOINT_DIR_TAG: ckpt_dir})
    if resume:
        tracking.set_status(logger, "RUNNING")
    log.info("MLflow run %s (experiment %s)", logger.run_id, logger.experiment_id)
    log.info("model: %s", parameter_summary(model, trained_top_stages(cfg.model, model)))
    return Run(cfg, dm, source, model, logger, out_dir, ckpt_dir, resume)


def log_inputs(run: Run) -> None:
    """The resolved config, what the data turned out to hold, precisions and weight sources, skipped files."""
    cfg, source, logger = run.cfg, run.source, run.logger
    tracking.log_params(  # one call: what the data turned out to hold wins over the config's data/class_names
        logger,
        {
            **OmegaConf.to_container(cfg, resolve=True),
            "data/class_names": ",".join(source.class_names),
            "data/num_classes": len(source.class_names),
            **{f"data/n_{s}": len(getattr(source, s)) for s in ("train", "val", "test") if getattr(source, s)},
            # the branches that run in bf16 autocast (model.bf16_branches=auto resolved by measurement)
            "precision/bf16_branches": bf16_param(cfg, run.model),
            **({"precision/bf16_fallback": fallback} if (fallback := bf16_fallback_param(cfg, run.model)) else {}),
        },
    )
    tracking.log_params(logger, {f"weights/{k}": v or "none" for k, v in run.model.weights_sources.items()})
    where = str(cfg.data.get("root") or cfg.data.get("path") or "generated in memory")
    splits = {s: getattr(source, s) for s in ("train", "val", "test")}
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    tracking.log_dataset_inputs(logger, uri, str(cfg.data.name), where, splits)
    logger.log_metrics({"data/skipped": len(source.skipped)})
    if source.skipped:
        tracking.log_artifact(logger, write_skipped_csv(source.skipped, run.out_dir / "skipped_files.csv"))
    config_path = run.out_dir / "config.yaml"
    OmegaConf.save(cfg, config_path, resolve=True)
    tracking.log_artifact(logger, config_path)


def cache_features(run: Run) -> None:
    """model.feature_cache=true: the pooled features of the branches frozen for the whole run, computed once
    (or read from data.cache_dir/features), so training runs only heads, fusion and trainable branches."""
    cfg, dm = run.cfg, run.dm
    if not cfg.model.get("feature_cache"):
        return
    keys = frozen_for_whole_run(cfg.model, run.model, cfg.trainer.get("max_epochs"))
    if not keys:
        raise ConfigError(
            "model.feature_cache=true but no pretrained branch is frozen for the whole run; set "
            "model.trainable_layers=0 (every pretrained branch frozen), 'model.trainable_layers={<branch>: 0}' "
            "or model.freeze_backbone_epochs >= trainer.max_epochs"
        )
    if run.model.mixer is not None and run.model.mixer.mixes:  # label smoothing alone is fine
        raise ConfigError(
            "model.feature_cache=true cannot be combined with model.mixup: cached features are of unmixed images; "
            "set model.mixup.mixup_alpha=0 model.mixup.cutmix_alpha=0 or model.feature_cache=false"
        )
    views = int(cfg.model.get("feature_cache_views") or 0)
    if views and dm.augment is None:
        raise ConfigError(
            f"model.feature_cache_views={views} needs augmentation to draw views from; set data.augment.enabled=true "
            "or model.feature_cache_views=0"
        )
    store, report = build_store(
        run.model,
        keys,
        run.source.train,
        run.source.val,
        cfg.data.get("cache_dir"),
        views=views,
        augment=dm.augment,
        seed=int(cfg.seed),
        batch_size=dm.batch_size,
    )
    dm.feature_store = store
    augmentation = f"{views} fixed augmented views per image" if views else "none (un-augmented images)"
    tracking.log_params(
        run.logger,
        {
            "feature_cache/branches": ",".join(keys),
            "feature_cache/augmentation": augmentation,
            "feature_cache/read": ",".join(report.hits) or "none",
            "feature_cache/computed": ",".join(report.misses) or "none",
        },
    )
    run.logger.log_metrics({"time/feature_cache_seconds": report.seconds})


def fit(run: Run, parts: TrainerParts) -> None:
    """Train every branch together (resuming from the last checkpoint when asked), then restore the best epoch."""
    started = time.perf_counter()
    checkpoint = run.resume and run.resume.checkpoint
    parts.trainer.fit(run.model, datamodule=run.dm, ckpt_path=checkpoint, weights_only=True)
    run.logger.log_metrics({FIT_SECONDS: time.perf_counter() - started})
    restore_best(run.model, parts.checkpoint)


def save_model(run: Run, parts: TrainerParts) -> Path:
    """The final checkpoint (best weights, fitted fusion, thresholds) as an artifact, and the pyfunc model."""
    final_ckpt = run.out_dir / "checkpoints" / FINAL_CHECKPOINT
    parts.trainer.save_checkpoint(final_ckpt, weights_only=True)
    tracking.log_artifact(run.logger, final_ckpt, "checkpoints")
    if run.cfg.tracking.log_model and rank_zero_only.rank == 0:
        uri = tracking.resolve_tracking_uri(run.cfg.logger.get("tracking_uri"))
        aliases = list(run.cfg.tracking.get("aliases") or [])
        log_pyfunc_model(uri, run.logger.run_id, final_ckpt, run.cfg.tracking.get("register_as"), aliases)
    return final_ckpt


def test_and_report(run: Run) -> None:
    """The final model on the test split, once, through the inference path (rank 0 under DDP): metrics,
    intervals, `test_predictions.csv`, plots, Grad-CAM."""
    if rank_zero_only.rank != 0:
        return
    cfg = run.cfg
    run.test_results = log_test_report(
        run.logger,
        run.model,
        run.source.test,
        run.out_dir,
        int(cfg.metrics.bootstrap),
        int(cfg.seed),
        int(cfg.gradcam.n_images),
        run.dm.batch_size,
    )


def parameter_summary(model: FusionClassifier, top_stages_only: Mapping[str, int] | None = None) -> str:
    """'resnet18 11.2 M, small_cnn 0.4 M, fusion 0 (11.6 M parameters, 11.6 M trainable)'; trainable counts
    only the top K stages of the backbones `top_stages_only` maps to K (`model.trainable_layers`: frozen all run)."""

    def millions(n: int) -> str:
        return f"{n / 1e6:.1f} M" if n >= 50_000 else f"{n / 1e3:.1f} K" if n >= 1_000 else str(n)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    frozen = {id(p) for key, k in (top_stages_only or {}).items() for p in below_top(model.backbones[key], k)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in frozen)
    parts = [f"{k} {millions(count(model.backbones[k]) + count(model.heads[k]))}" for k in model.keys]
    parts.append(f"fusion {millions(count(model.fusion))}")
    return f"{', '.join(parts)} ({millions(count(model))} parameters, {millions(trainable)} trainable)"


def summary(run: Run, score: float | None = None, source: str = "", interval: tuple[float, float] | None = None) -> str:
    """What a run prints last: its validation selection score (with its 95% interval when it has one), the test
    table with the thresholds and where they were chosen, the full run id, where its files are, and how to look
    at it in the MLflow UI."""
    model, lines = run.model, []
    if score is not None:
        ci = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        lines.append(f"validation score (what sweeps, searches and compare rank runs on): {score:.4f}{ci} ({source})")
    results = run.test_results
    if results is not None and not results.empty:
        values = results.set_index(["model", "metric"])["value"]
        thresholds = {**(model.hparams.get("branch_thresholds") or {}), FUSED: model.hparams.threshold}
        where = f"branches on val, fused on {run.fusion.threshold_on if run.fusion else 'val'}"
        binary = int(model.hparams.num_classes) == 2
        rule = run.cfg.metrics.threshold
        lines.append(
            f"test split, {len(run.source.test)} images"
            + (f"; thresholds: metrics.threshold={rule}, chosen on validation ({where})" if binary else "; argmax")
        )
        lines.append("| model | threshold | acc | sensitivity | specificity | auroc |")
        lines.append("|---|---|---|---|---|---|")
        for name in [*model.keys, FUSED]:
            cells = [f"{values.get((name, m), float('nan')):.3f}" for m in ("acc", "recall", "specificity", "auroc")]
            threshold = f"{float(thresholds.get(name, model.hparams.threshold)):.3f}" if binary else "argmax"
            lines.append(f"| {name} | {threshold} | " + " | ".join(cells) + " |")
    logger = run.logger
    info = logger.experiment.get_run(logger.run_id).info
    lines.append(f"MLflow run {logger.run_id} (experiment {run.cfg.logger.get('experiment_name', 'xrayfusion')})")
    lines.append(f"artifacts: {info.artifact_uri}")
    lines.append(f"outputs:   {run.out_dir.resolve()}")
    uri = tracking.resolve_tracking_uri(run.cfg.logger.get("tracking_uri"))
    lines.append(f"look at it: mlflow ui --backend-store-uri {uri}" if tracking.is_local(uri) else f"look at it: {uri}")
    return "\n".join(lines)


def clean_up(run: Run) -> list[Path]:
    """A finished run needs no resume state: remove its epoch checkpoints and `last.ckpt` (full Lightning
    checkpoints with optimizer state), keeping `best.ckpt` (weights, fitted fusion, thresholds). Returns what
    was removed. A killed or failed run keeps everything, so it can be resumed."""
    removed = []
    for path in sorted(run.ckpt_dir.glob("*.ckpt")):
        if path.name != FINAL_CHECKPOINT:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def finish(run: Run, parts: TrainerParts) -> float | None:
    """Training curves, the best-epoch value of `optimized_metric` and the run's selection score (what sweeps,
    searches and `compare` rank on; `sweep.selection_score`); prints the summary; returns the score."""
    if parts.history.history and rank_zero_only.rank == 0:
        log_figure(run.logger, plots.training_curves_figure(parts.history.history), run.out_dir, "training_curves.png")
    best_score = parts.checkpoint.best_model_score
    best = None if best_score is None else float(best_score)
    metric = str(run.cfg.optimized_metric)
    run.logger.log_metrics(sweep.best_metric(metric, best))
    score, source = sweep.selection_score(metric, best, run.fusion.val_auroc if run.fusion else None)
    post_fit = run.fusion is not None and source == FUSED_VAL_AUROC
    interval = run.fusion.val_auroc_ci if post_fit else None
    if score is not None:
        run.logger.log_metrics({SELECTION_METRIC: score})
        if interval:
            run.logger.log_metrics(dict(zip(SELECTION_CI, interval, strict=True)))
        tracking.log_params(run.logger, {SELECTION_SOURCE: source, SELECTION_MODE: str(run.cfg.optimized_mode)})
    if rank_zero_only.rank == 0:
        removed = clean_up(run)
        log.info("removed %d resume checkpoint(s) of the finished run; kept %s", len(removed), FINAL_CHECKPOINT)
        on = f", on {run.fusion.val_auroc_on}" if post_fit else ""
        print(summary(run, score, source + on, interval), flush=True)
    return score


def train(
    cfg: DictConfig,
    callbacks: Sequence[pl.Callback] = (),
    stops: tuple[type[BaseException], ...] = (),
) -> float | None:
    """Run one training; returns its selection score (`sweep.selection_score`: the final fused model's validation
    AUROC on predictions its fusion's fit has not seen, or the best epoch's `optimized_metric`; None when there is
    neither).

    `callbacks` join the trainer's own (a search's pruning callback). An exception of a type in `stops` raised
    while the run is open (optuna.TrialPruned) ends it KILLED, not FAILED, removes its resume checkpoints as a
    finished run's are removed, and propagates to the caller.
    """
    run = start_run(cfg)
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    interval = cfg.tracking.get("system_metrics_interval_s")
    try:
        with run_status(run.logger, stops), tracking.system_metrics(run.logger, uri, interval):
            log_inputs(run)
            cache_features(run)
            parts = build_trainer(cfg, run.model, run.logger, run.ckpt_dir, run.out_dir, extra_callbacks=callbacks)
            fit(run, parts)
            run.fusion = fit_fusion(cfg, run.model, run.dm, run.logger, run.out_dir)  # + thresholds
            save_model(run, parts)
            if cfg.get("test", True) and run.source.test is not None:
                test_and_report(run)
            return finish(run, parts)
    except stops:
        if rank_zero_only.rank == 0:
            removed = clean_up(run)
            log.info("run stopped on purpose: removed %d checkpoint(s); nothing to resume", len(removed))
        raise
