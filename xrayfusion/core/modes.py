"""`eval_mode`: run a module in eval mode and restore its previous mode afterwards, even on errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """`module.eval()` (and no autograd unless `no_grad=False`) inside the block; the mode it had after."""
    was_training = module.training
    module.eval()
    try:
        if no_grad:
            with torch.no_grad():
                yield module
        else:
            yield module
    finally:
        module.train(was_training)
