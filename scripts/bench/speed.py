"""speed: (a) xrayfusion joint vs (b) seed-style ImageFolder loops vs (c) lean loops, and (d) one branch in
xrayfusion, alternating within each round; prints the contender and ratio tables."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from bench.common import (
    Result,
    Setup,
    add_run_arguments,
    compose_cfg,
    make_subset_root,
    median,
    print_setup,
    speed_overrides,
)
from bench.joint import xrayfusion_joint
from bench.plain import lean_loop, seed_style
from xrayfusion.core.runtime import configure_torch
from xrayfusion.models import FusionClassifier
from xrayfusion.models.precision import autotune_bf16

LABELS = {
    "a": "(a) xrayfusion, K branches jointly",
    "b": "(b) seed style: ImageFolder + JPEG decode every epoch, one model after another",
    "c": "(c) lean plain loop over decoded tensors, one model after another",
    "d": "(d) xrayfusion, one branch",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--contenders", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    p.add_argument("--seed-workers", type=int, default=min(2, os.cpu_count() or 1), help="workers of (b)")


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="xrayfusion-bench-") as tmp:
        counts = make_subset_root(Path(args.data_root), Path(tmp), args.max_train, args.max_test, args.seed)
        cfg = compose_cfg(speed_overrides(args, tmp))
        _resolve_auto_bf16(cfg, device)
        setup = Setup(cfg, device, train_workers=args.seed_workers)
        first = setup.branches[0]
        contenders: dict[str, Callable[[], Result]] = {
            "a": lambda: xrayfusion_joint(setup),
            "b": lambda: seed_style(setup),
            "c": lambda: lean_loop(setup),
            "d": lambda: xrayfusion_joint(setup, [first], name="d"),
        }
        chosen = [c for c in args.contenders if c in contenders]
        print_setup(args, cfg, counts, device)
        results: dict[str, list[Result]] = {c: [] for c in chosen}
        for r in range(args.rounds):
            order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]  # rotate so no contender is always first
            for c in order:
                torch.manual_seed(args.seed + r)
                res = contenders[c]()
                results[c].append(res)
                print(f"round {r + 1} {c}: wall {res.wall_s:.1f} s, train {res.total_train_s:.1f} s", flush=True)
        print_speed(results, setup, args.epochs)
        print_guard_cost(device)


def _resolve_auto_bf16(cfg: DictConfig, device: torch.device) -> None:
    """model.bf16_branches=auto: measure once, up front, so every contender runs the same per-model precision."""
    if cfg.model.get("bf16_branches") != "auto":
        return
    configure_torch(cfg.runtime.threads, cfg.runtime.matmul_precision)
    size = int(cfg.data.image_size)
    model = FusionClassifier(
        list(cfg.model.branches), 2, {"name": "average"}, image_size=size, channels_last=bool(cfg.model.channels_last)
    )
    chosen, timings = autotune_bf16(model, int(cfg.data.batch_size), size, on_gpu=device.type == "cuda")
    report = ", ".join(f"{t.branch} {t.speedup:.2f}x" for t in timings)
    print(f"model.bf16_branches=auto -> {chosen} (bf16 speed-up per step: {report or 'not timed'})", flush=True)
    cfg.model.bf16_branches = chosen


def print_speed(results: dict[str, list[Result]], setup: Setup, epochs: int) -> None:
    print("\n| contender | wall s | decode s | train s | images/s | test auroc |")
    print("|---|---|---|---|---|---|")
    med = {}
    for c, runs in results.items():
        wall = median([r.wall_s for r in runs])
        train = median([r.total_train_s for r in runs])
        decode = median([r.decode_s for r in runs])
        n = runs[0].n_images
        k = 1 if c == "d" else len(setup.branches)
        med[c] = (wall, train)
        aurocs = {m: median([r.auroc[m] for r in runs]) for m in runs[0].auroc}
        auroc_text = ", ".join(f"{m} {v:.3f}" for m, v in aurocs.items())
        per_model = ""
        if len(runs[0].train_s) > 1:
            parts = [f"{m} {median([r.train_s[m] for r in runs]):.1f}" for m in runs[0].train_s]
            per_model = " (" + ", ".join(parts) + ")"
        ips = n * epochs * k / train if train > 0 else float("nan")
        print(f"| {LABELS[c]} | {wall:.1f} | {decode:.1f} | {train:.1f}{per_model} | {ips:.0f} | {auroc_text} |")
    print("\nimages/s = training images x epochs x models / train seconds (each model sees each image once an epoch).")
    print("wall = files on disk to trained models and test predictions; medians over rounds.\n")
    print("| ratio | value |")
    print("|---|---|")
    if "a" in med and "b" in med:
        print(f"| (b) seed style / (a) joint, wall | {med['b'][0] / med['a'][0]:.2f}x |")
    if "a" in med and "c" in med:
        print(f"| (c) lean loops / (a) joint, wall | {med['c'][0] / med['a'][0]:.2f}x |")
        print(f"| (c) lean loops / (a) joint, train | {med['c'][1] / med['a'][1]:.2f}x |")
    if "d" in med and "c" in med:
        first = setup.branches[0]
        lean_first = median([r.train_s[first] for r in results["c"]])
        print(f"| (d) framework overhead, {first}: xrayfusion / lean train | {med['d'][1] / lean_first:.2f}x |")


def guard_cost(device: torch.device, every_n_steps: int, steps: int = 2000) -> float:
    """Microseconds per training step that the non-finite-loss guard adds with `every_n_steps`, on `device`.

    Each step makes a fresh loss on the device (as a training step does) and runs the guard's hook; the
    read-backs every N steps wait for that loss. A real step queues more work, so on a GPU a read-back can
    wait longer than here: the figure is the guard's own cost.
    """
    import time
    from types import SimpleNamespace

    from xrayfusion.training.callbacks import FiniteLossGuard

    guard = FiniteLossGuard(every_n_steps)
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    trainer = SimpleNamespace(global_step=0, strategy=strategy, checkpoint_callback=None, current_epoch=0)
    x = torch.ones(4096, device=device)

    def loop(n: int, with_guard: bool) -> float:
        started = time.perf_counter()
        for step in range(n):
            trainer.global_step = step
            loss = (x * 1.0001).sum()
            if with_guard:
                guard.on_before_backward(trainer, None, loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    loop(200, True)  # warm-up
    base = min(loop(steps, False) for _ in range(3))
    guarded = min(loop(steps, True) for _ in range(3))
    return max(0.0, (guarded - base) / steps * 1e6)


def print_guard_cost(device: torch.device) -> None:
    print("\n| non-finite-loss guard (callbacks.loss_guard.every_n_steps) | us per step |")
    print("|---|---|")
    for n, when in ((1, "auto on a single-process CPU run"), (50, "auto on GPUs and under DDP")):
        print(f"| every {n} step(s): {when} | {guard_cost(device, n):.1f} |")
