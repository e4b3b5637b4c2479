"""Multi-process (DDP) helpers: evaluation shards without padding, gathering per-sample outputs."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler
from torchmetrics.utilities.distributed import gather_all_tensors


def eval_sampler(dataset: Dataset, trainer: pl.Trainer | None) -> Sampler | None:
    """Under DDP, a disjoint share of `dataset` per process with no sample repeated (Lightning's default
    DistributedSampler pads the last shard with duplicates, which would bias validation and test metrics);
    None in a single process."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


def gather_rows(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate `tensor` (first dimension may differ per process) from every process, on the CPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    return torch.cat([t.cpu() for t in gather_all_tensors(tensor.to(device))])
