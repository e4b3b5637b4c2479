"""bootstrap: seconds for evaluate's 95% bootstrap intervals, all resamples at once (binary) vs one
`compute_metrics` call per resample (the old loop), on the same resamples."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import cpu_name
from xrayfusion.evaluation.metrics import bootstrap_intervals, compute_metrics, resampled_binary_metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=624, help="624: the official Kermany test set")
    p.add_argument("--models", type=int, default=3, help="branches + fused, as evaluate scores them")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--loop-resamples", type=int, default=100, help="the loop is timed on these and scaled")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, 2, (args.images,), generator=gen)
    p1 = (0.4 * labels + 0.6 * torch.rand(args.images, generator=gen)).clamp(0, 1)
    probs = torch.stack([1 - p1, p1], dim=1)
    started = time.perf_counter()
    for _ in range(args.models):
        bootstrap_intervals(labels, probs, 0.5, args.resamples, args.seed)
    vectorised = time.perf_counter() - started

    idx = np.random.default_rng(args.seed).integers(0, args.images, size=(args.loop_resamples, args.images))
    started = time.perf_counter()
    for _ in range(args.models):
        for row in idx:
            compute_metrics(labels[torch.from_numpy(row)], probs[torch.from_numpy(row)], 0.5)
    loop = (time.perf_counter() - started) * args.resamples / args.loop_resamples
    counts = np.zeros_like(idx)
    np.add.at(counts, (np.arange(len(idx))[:, None], idx), 1)
    fast = resampled_binary_metrics(labels, probs, 0.5, counts)
    slow = [compute_metrics(labels[torch.from_numpy(r)], probs[torch.from_numpy(r)], 0.5) for r in idx[:20]]
    gap = max(abs(s[m] - fast[m][i]) for i, s in enumerate(slow) for m in s)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads")
    print(f"\n{args.resamples} bootstrap resamples of {args.images} images x {args.models} models")
    print("| method | seconds |")
    print("|---|---|")
    print(f"| all resamples at once (evaluate, training's test report) | {vectorised:.3f} |")
    print(f"| one compute_metrics call per resample (before; timed on {args.loop_resamples}, scaled) | {loop:.1f} |")
    print(f"\nlargest difference between the two on the same resamples: {gap:.1e}")
