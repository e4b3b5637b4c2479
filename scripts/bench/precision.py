"""precision: per branch, a training step in float32 vs bfloat16 autocast, timed as model.bf16_branches=auto
times it (xrayfusion.models.precision.time_branches)."""

from __future__ import annotations

import argparse

import torch

from bench.common import cpu_name, parse_bool
from xrayfusion.core.runtime import configure_torch, cpu_bf16_support
from xrayfusion.models import FusionClassifier
from xrayfusion.models.precision import choose_bf16_branches, time_branches


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--branches", nargs="+", default=["resnet18", "mobilenetv2_100", "efficientnet_lite0", "small_cnn"])
    p.add_argument("--image-size", type=int, default=None, help="default 64 on CPU, 224 on GPU")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=9, help="alternating float32/bf16 pairs after the warm-up")
    p.add_argument("--channels-last", default=None, type=parse_bool)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    size = args.image_size or (224 if device.type == "cuda" else 64)
    configure_torch(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"device: {device} ({name}; bf16 units: {cpu_bf16_support() if device.type == 'cpu' else 'gpu'}); "
        f"torch {torch.__version__}; threads {torch.get_num_threads()}"
    )
    channels_last = args.channels_last if args.channels_last is not None else True
    print(
        f"{size} px, batch {args.batch_size}, channels_last {channels_last}; per branch: forward + loss + backward, "
        f"2 warm-up steps per precision, then {args.steps} back-to-back float32/bf16 pairs, alternating order; "
        "medians, and the speed-up as the median pair's ratio (what auto decides on)",
        flush=True,
    )
    torch.manual_seed(args.seed)
    model = FusionClassifier(list(args.branches), 2, {"name": "average"}, image_size=size, channels_last=channels_last)
    timings = time_branches(model, args.batch_size, size, device, steps=args.steps)
    print("\n| branch | float32 ms/step | bf16 ms/step | bf16 speed-up | pair ratios |")
    print("|---|---|---|---|---|")
    for t in timings:
        ratios = ", ".join(f"{r:.2f}" for r in t.pair_speedups)
        print(f"| {t.branch} | {1000 * t.fp32_s:.0f} | {1000 * t.bf16_s:.0f} | {t.speedup:.2f}x | {ratios} |")
    print(f"\n>= 1.1x faster in bf16 here: model.bf16_branches=[{','.join(choose_bf16_branches(timings))}]")
