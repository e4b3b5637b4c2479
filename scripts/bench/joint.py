"""(a) and (d) of `speed`, and every setting of `switches`: xrayfusion trains every branch on each batch, with
the Trainer of `xrayfusion.training.factory.build_trainer` (the one the training command uses) and predicts
with `xrayfusion.evaluation.inference.predict`."""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from bench.common import Result, Setup, auroc, sync
from xrayfusion.data.datamodule import XRayDataModule
from xrayfusion.evaluation.inference import predict
from xrayfusion.models import FusionClassifier
from xrayfusion.models.module import bf16_branch_indices
from xrayfusion.training.factory import TrainerParts, build_model, build_trainer


class _NoLogger(Logger):
    """Logs nothing: build_trainer's LearningRateMonitor needs a logger, and the benchmark keeps no records."""

    @property
    def name(self) -> str:
        return "benchmark"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def benchmark_cfg(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` whose checkpoint callback writes no file: no last.ckpt, and with validation off the
    monitored metric never appears, so no best checkpoint either (nothing the benchmark would time)."""
    cfg = copy.deepcopy(cfg)
    cfg.callbacks.model_checkpoint.save_last = False
    return cfg


@contextmanager
def benchmark_trainer(
    cfg: DictConfig, model: FusionClassifier, device: torch.device, **overrides: Any
) -> Iterator[TrainerParts]:
    """build_trainer for a timed fit: no validation, logging, progress bar or summary; files in a temp folder."""
    with tempfile.TemporaryDirectory(prefix="xrayfusion-bench-trainer-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*could not find the monitored key")  # validation is off
        yield build_trainer(
            benchmark_cfg(cfg),
            model,
            _NoLogger(),
            Path(tmp) / "checkpoints",
            Path(tmp),
            accelerator=device.type if device.type != "cuda" else "gpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            **overrides,
        )


def xrayfusion_joint(setup: Setup, branches: Sequence[str] | None = None, name: str = "a") -> Result:
    cfg = setup.cfg.copy()
    if branches is not None:
        cfg.model.branches = list(branches)
        chosen = bf16_branch_indices(setup.branches, cfg.model.get("bf16_branches"))
        cfg.model.bf16_branches = [setup.branches[i] for i in chosen if setup.branches[i] in branches]
    started = time.perf_counter()
    dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    source = dm.prepare()
    decode_s = time.perf_counter() - started
    model = build_model(cfg, dm)
    with benchmark_trainer(cfg, model, setup.device) as parts:
        fit_started = time.perf_counter()
        parts.trainer.fit(model, train_dataloaders=dm.train_dataloader())
        sync(setup.device)
        fit_s = time.perf_counter() - fit_started
    model.to(setup.device)
    with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.bf16):
        out = predict(model, dm.loader("test"))
    aurocs = {b: auroc(out.labels, out.probs[:, i, 1]) for i, b in enumerate(cfg.model.branches)}
    if len(aurocs) > 1:
        aurocs["fused (average)"] = auroc(out.labels, out.probs[:, :, 1].mean(1))
    return Result(name, time.perf_counter() - started, decode_s, {"joint": fit_s}, aurocs, len(source.train))
