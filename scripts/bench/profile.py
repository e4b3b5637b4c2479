"""profile: where the time of joint training steps goes. The steps are those of the training command (the
build_trainer Trainer, for --steps batches of one epoch); a callback times the phases between Lightning's
hooks and torch.profiler records the operators of those steps."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from bench.common import Setup, add_run_arguments, compose_cfg, make_subset_root, print_setup, speed_overrides, sync
from bench.joint import benchmark_trainer
from xrayfusion.data.datamodule import XRayDataModule
from xrayfusion.training.factory import build_model

PHASES = ("data (augment + collate)", "forward + loss", "backward", "optimizer")


class PhaseTimer(pl.Callback):
    """Seconds per phase of each training step, measured between Lightning's hooks; it also runs the profiler
    over the steps only (not the Trainer's setup).

    data: fetch, augment, collate and copy to the device (before on_train_batch_start); forward + loss: up to
    on_before_backward; backward: up to on_before_optimizer_step; optimizer: the step, up to on_train_batch_end.
    Lightning runs forward and backward inside optimizer.step (a closure), so the phases are not profiler ranges:
    they would cross its Optimizer.step range and muddle the operator table."""

    def __init__(self, device: torch.device, prof: profile) -> None:
        self.device, self.prof = device, prof
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._phase: str | None = None
        self._mark = 0.0

    def _enter(self, phase: str | None, count: bool = True) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self._phase is not None and count:
            self.seconds[self._phase] += now - self._mark
        self._phase, self._mark = phase, now

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prof.start()
        self._enter("data (augment + collate)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._enter("forward + loss")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._enter("backward")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._enter("optimizer")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._enter("data (augment + collate)")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(None, count=False)  # after the last step: no batch follows
        self.prof.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=15, help="rows of the operator table")


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="xrayfusion-bench-") as tmp:
        counts = make_subset_root(Path(args.data_root), Path(tmp), args.max_train, args.max_test, args.seed)
        setup = Setup(compose_cfg(speed_overrides(args, tmp)), device)
        print_setup(args, setup.cfg, counts, device)
        cfg = setup.cfg
        dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
        dm.prepare()
        model = build_model(cfg, dm)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(activities=activities)
        timer = PhaseTimer(device, prof)
        with benchmark_trainer(cfg, model, device, max_epochs=1, limit_train_batches=args.steps) as parts:
            parts.trainer.callbacks.insert(0, timer)  # first: its epoch end closes the last step
            parts.trainer.fit(model, train_dataloaders=dm.train_dataloader())
        phases = timer.seconds
        total = sum(phases.values())
        print(f"\n{args.steps} training steps, {total:.1f} s (profiler on; relative shares are what matter)\n")
        print("| phase | s | share |")
        print("|---|---|---|")
        for key, dt in phases.items():
            print(f"| {key} | {dt:.2f} | {100 * dt / total:.0f}% |")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print("\n```\n" + prof.key_averages().table(sort_by=sort, row_limit=args.top) + "\n```")
