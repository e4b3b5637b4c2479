"""switches: which speed settings pay off for joint training on this machine (precision x channels-last x
compile x workers), each a config override of the same xrayfusion run."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import Setup, add_run_arguments, compose_cfg, make_subset_root, median, print_setup, speed_overrides
from bench.joint import xrayfusion_joint

SWITCHES = {
    "fp32": [],
    "bf16": ["trainer.precision=bf16-mixed"],
    "fp32+cl": ["model.channels_last=true"],
    "bf16+cl": ["trainer.precision=bf16-mixed", "model.channels_last=true"],
    "fp32+workers1": ["data.num_workers=1"],
    "fp32+compile": ["model.compile=true"],
    "fp32+fused_adamw": ["optimizer.fused=true"],
    "cl+bf16auto": ["model.channels_last=true", "model.bf16_branches=auto"],
    "cl+compile": ["model.channels_last=true", "model.compile=true"],
    "cl+workers1": ["model.channels_last=true", "data.num_workers=1"],
}
# pretrained branches training only their top K stages (no backward through the others); needs model.pretrained=true
SWITCHES.update({f"cl+trainable{k}": ["model.channels_last=true", f"model.trainable_layers={k}"] for k in (6, 5, 4, 3)})


def setting(text: str) -> str:
    """A --settings entry: a SWITCHES name, optionally with `@<px>` for its own image size (e.g. cl+trainable4@160
    beside fp32+cl at --image-size 128): what a cheaper step at a larger size costs, side by side."""
    name, at, size = text.partition("@")
    if name not in SWITCHES:
        raise argparse.ArgumentTypeError(f"unknown setting {name!r}; choose from {', '.join(SWITCHES)}")
    if at and not (size.isdigit() and int(size) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: the size after @ must be a number of pixels, e.g. {name}@160")
    return text


def setting_overrides(text: str) -> list[str]:
    """The config overrides of a --settings entry (see `setting`)."""
    name, _, size = setting(text).partition("@")
    return [*SWITCHES[name], *([f"data.image_size={size}"] if size else [])]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(SWITCHES),
        type=setting,
        metavar="SETTING[@PX]",
        help=f"any of {', '.join(SWITCHES)}; @PX trains that setting at PX pixels instead of --image-size",
    )


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="xrayfusion-bench-") as tmp:
        counts = make_subset_root(Path(args.data_root), Path(tmp), args.max_train, args.max_test, args.seed)
        base = [
            *speed_overrides(args, tmp),
            "trainer.precision=32-true",
            "model.channels_last=false",
            "data.num_workers=0",
        ]
        chosen = {k: setting_overrides(k) for k in dict.fromkeys(args.settings)}
        setups = {k: Setup(compose_cfg([*base, *v]), device) for k, v in chosen.items()}
        print_setup(args, next(iter(setups.values())).cfg, counts, device)
        times: dict[str, list[float]] = {k: [] for k in chosen}
        for r in range(args.rounds):
            for k in list(chosen)[r % len(chosen) :] + list(chosen)[: r % len(chosen)]:
                res = xrayfusion_joint(setups[k])
                times[k].append(res.total_train_s)
                print(f"round {r + 1} {k}: train {res.total_train_s:.1f} s", flush=True)
                n = res.n_images
        ref = median(times[next(iter(chosen))])
        print("\n| setting | train s | images/s | speed-up |")
        print("|---|---|---|---|")
        for k, ts in times.items():
            t = median(ts)
            print(f"| {k} | {t:.1f} | {n * args.epochs / t:.0f} | {ref / t:.2f}x |")
