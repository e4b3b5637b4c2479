"""Per-branch precision: time each branch in float32 and in bfloat16 autocast, keep bf16 where it is faster.

Whether bf16 pays off depends on the hardware and the layers: on CPUs with AMX, dense convolutions run 1.5-2.6x
faster in bf16 while depthwise ones (MobileNet, EfficientNet) run slower; without AMX or AVX512-BF16 bf16 is
emulated and always slower. `model.bf16_branches=auto` measures instead of guessing, like cuDNN's benchmark mode.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xrayfusion.core.runtime import cpu_bf16_support
from xrayfusion.models.backbones import freeze_below_top

log = logging.getLogger(__name__)

AUTO = "auto"
# model.bf16_fallback: what named bf16 branches (model.bf16_branches=[...] or all) do on a CPU without bf16 units
# (neither AMX nor AVX512-BF16), where bf16 is emulated at a tenth of float32's speed or less: run in float32
# (a slightly different network from one trained with bf16 units), or keep the emulated bf16
FALLBACK_FLOAT32 = "float32"
FALLBACK_EMULATE = "emulate"
FALLBACKS = (FALLBACK_FLOAT32, FALLBACK_EMULATE)


@dataclass(frozen=True)
class BranchTiming:
    """Seconds of one training step (forward, loss, backward) of one branch in each precision (the median over
    the timed steps) and, when timed in pairs, each pair's float32/bf16 ratio."""

    branch: str
    fp32_s: float
    bf16_s: float
    pair_speedups: tuple[float, ...] = ()

    @property
    def speedup(self) -> float:
        """The median of the pairs' float32/bf16 ratios (the two steps of a pair run back to back, and one pair
        hit by a load spike or one unusually fast step cannot move the median); without pairs, the ratio of the
        two times."""
        if self.pair_speedups:
            return statistics.median(self.pair_speedups)
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else float("nan")


def _step_seconds(branch: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    """Seconds of one forward + backward pass of `branch` (float32 or bfloat16 autocast)."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = branch(x)
    F.cross_entropy(logits.float(), y).backward()
    branch.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _paired_seconds(
    branch: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int
) -> tuple[list[float], list[float]]:
    """`steps` float32 and bf16 step times, after two warm-up steps of each (kernel selection and allocator
    caches settle in the first steps), timed in back-to-back pairs whose order alternates so that neither
    precision always runs first."""
    for _ in range(2):
        _step_seconds(branch, x, y, False), _step_seconds(branch, x, y, True)
    fp32, bf16 = [], []
    for i in range(steps):
        for use_bf16 in (False, True) if i % 2 == 0 else (True, False):
            (bf16 if use_bf16 else fp32).append(_step_seconds(branch, x, y, use_bf16))
    return fp32, bf16


def _timing(name: str, fp32: list[float], bf16: list[float]) -> BranchTiming:
    ratios = tuple(f / b for f, b in zip(fp32, bf16, strict=True) if b > 0)
    return BranchTiming(name, statistics.median(fp32), statistics.median(bf16), ratios)


def time_branches(
    model: torch.nn.Module,
    batch_size: int,
    image_size: int,
    device: torch.device | str = "cpu",
    steps: int = 9,
    trainable_layers: Mapping[str, int] | None = None,
) -> list[BranchTiming]:
    """Time a training step of each branch of a FusionClassifier (on copies: the model is left untouched), on
    the input that branch trains on: `image_size` px images (the decode size) resized to its own size
    (`model.branch_sizes`), with the stages the run keeps frozen frozen: `trainable_layers` maps a branch key to
    the number of top stages that train (`model.trainable_layers`), so no backward runs through the others."""
    trainable_layers = trainable_layers or {}
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 1, image_size, image_size), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, int(model.hparams.num_classes), (batch_size,), generator=gen).to(device)
    timings = []
    with torch.no_grad():
        prepared: dict = {}
        inputs = [model.branch_input(images, i, prepared).to(device) for i in range(len(model.keys))]
    for i, (name, key) in enumerate(zip(model.hparams.branches, model.keys, strict=True)):
        branch = torch.nn.Sequential(copy.deepcopy(model.backbones[key]), copy.deepcopy(model.heads[key]))
        branch.to(device).train()
        if key in trainable_layers:
            freeze_below_top(branch[0], trainable_layers[key])
        timings.append(_timing(str(name), *_paired_seconds(branch, inputs[i], y, steps)))
        del branch
    return timings


def choose_bf16_branches(timings: list[BranchTiming], min_speedup: float = 1.1) -> list[str]:
    """Branches whose bf16 step beats float32 by at least `min_speedup` (a margin against timing noise), on the
    median pair's ratio: one lucky bf16 step or one disturbed float32 step cannot decide it."""
    return [t.branch for t in timings if t.speedup >= min_speedup]


def autotune_bf16(
    model: torch.nn.Module,
    batch_size: int,
    image_size: int,
    on_gpu: bool = False,
    min_speedup: float = 1.1,
    trainable_layers: Mapping[str, int] | None = None,
) -> tuple[list[str], list[BranchTiming]]:
    """Resolve `bf16_branches=auto` on `model` in place; returns the chosen branches and the timings.

    GPUs with bf16 tensor cores: every branch; other GPUs and CPUs without bf16 instructions: none. Otherwise each
    branch is timed, training as the run trains it (`trainable_layers`: see `time_branches`).
    """
    if on_gpu:  # bf16 tensor cores (Ampere and later); older GPUs only emulate bf16
        bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        chosen, timings = (list(model.hparams.branches) if bf16_gpu else []), []
    elif cpu_bf16_support() == "none":
        chosen, timings = [], []
    else:
        timings = time_branches(model, batch_size, image_size, trainable_layers=trainable_layers)
        chosen = choose_bf16_branches(timings, min_speedup)
    for t in timings:
        log.info(
            "bf16 autotune %s: float32 %.0f ms, bf16 %.0f ms per step (median of %d; speed-up %.2fx, median pair)",
            t.branch,
            1000 * t.fp32_s,
            1000 * t.bf16_s,
            len(t.pair_speedups),
            t.speedup,
        )
    log.info("model.bf16_branches=auto chose %s", chosen)
    model.set_bf16_branches(chosen)
    return chosen, timings
