"""Process-wide speed settings: torch threads, float32 matmul precision, DataLoader workers."""

from __future__ import annotations

import logging
import os

import torch

from xrayfusion.core.errors import ConfigError

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks and container limits where visible)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(value: int | str | None) -> int:
    """DataLoader workers: an int, or 'auto' (0 on machines with <= 4 CPUs, where workers steal compute)."""
    if value is None or value == "auto":
        cpus = available_cpus()
        return 0 if cpus <= 4 else min(4, cpus // 4)
    try:
        workers = int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.num_workers={value!r} must be an integer >= 0 or 'auto'") from err
    if workers < 0:
        raise ConfigError(f"data.num_workers={workers} must be >= 0 (0 = load in the main process) or 'auto'")
    return workers


def configure_torch(threads: int | None = None, matmul_precision: str | None = "high") -> dict[str, object]:
    """Set torch's intra-op threads (None keeps torch's default: one per physical core) and the float32
    matmul precision ('high' lets GPUs use TF32); returns the settings in effect, for logging."""
    if threads is not None:
        if int(threads) <= 0:
            raise ConfigError(f"runtime.threads={threads} must be a positive integer, or null for torch's default")
        torch.set_num_threads(int(threads))
    if matmul_precision:
        if matmul_precision not in ("highest", "high", "medium"):
            raise ConfigError(f"runtime.matmul_precision={matmul_precision!r}; choose highest, high or medium")
        torch.set_float32_matmul_precision(matmul_precision)
    settings = {"threads": torch.get_num_threads(), "matmul_precision": torch.get_float32_matmul_precision()}
    log.info("torch runtime: %s", settings)
    return settings


def cpu_bf16_support() -> str:
    """What this CPU offers bfloat16 math: 'amx' (tile units), 'avx512_bf16', or 'none' (emulated, slow)."""
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return "none"


def warn_slow_cpu_bf16(accelerator: str = "auto", what: str | None = None) -> bool:
    """Log a warning when bfloat16 is asked for on a CPU run whose CPU has no bf16 instructions; True if warned."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu or cpu_bf16_support() != "none":
        return False
    what = what or "bfloat16 requested (trainer.precision=bf16-* or model.bf16_branches)"
    log.warning(
        "%s but this CPU has neither AMX nor AVX512-BF16: bf16 is emulated and usually slower than float32; "
        "drop the bf16 settings on this machine (model.bf16_branches=auto measures instead)",
        what,
    )
    return True
