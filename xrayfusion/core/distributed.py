"""Multi-process (DDP) helpers: validation shards without padding."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler


def eval_sampler(dataset: Dataset, trainer: pl.Trainer | None) -> Sampler | None:
    """Under DDP, a disjoint share of `dataset` per process with no sample repeated (Lightning's default
    DistributedSampler pads the last shard with duplicates, which would bias validation and test metrics);
    None in a single process."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
