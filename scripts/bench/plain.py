"""The plain-PyTorch baselines of `speed`, written the way the users' old scripts were: (b) seed style and
(c) a lean loop. Both train one model after another through the same loop (`train_each`); neither uses
xrayfusion's model or Trainer, so they stay independent of what they are compared with."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from bench.common import CLASSES, Result, Setup, auroc, image_files, sync
from xrayfusion.data.decode import decode_images
from xrayfusion.data.transforms import TensorDataset, build_augment

Prepare = Callable[[torch.Tensor], torch.Tensor]


# ---- the one plain loop: each model trained, then tested, one after another --------------------------------------
def train_each(
    setup: Setup,
    branches: Sequence[str],
    loader: DataLoader,
    test_loader: DataLoader,
    weight: torch.Tensor | None,
    prepare: Prepare,
) -> tuple[dict[str, float], dict[str, float]]:
    """Train and test a fresh timm model per branch; returns train seconds and test AUROC per branch."""
    train_s, aurocs = {}, {}
    for name in branches:
        model, bf16 = _model(name, setup), setup.bf16_for(name)
        train_s[name] = _train(model, loader, setup, weight, prepare, bf16)
        aurocs[name] = auroc(*reversed(_predict(model, test_loader, setup, prepare, bf16)))
    return train_s, aurocs


def _model(name: str, setup: Setup) -> torch.nn.Module:
    model = timm.create_model(name, in_chans=int(setup.cfg.model.in_chans), num_classes=2).to(setup.device)
    return model.to(memory_format=torch.channels_last) if setup.channels_last else model


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=2).float()
    return counts.sum() / (counts.clamp(min=1) * len(counts))


def _train(
    model: torch.nn.Module,
    loader: DataLoader,
    setup: Setup,
    weight: torch.Tensor | None,
    prepare: Prepare,
    bf16: bool,
) -> float:
    """Train `model` for the configured epochs with AdamW + one-cycle (bf16: autocast); returns seconds."""
    cfg = setup.cfg
    epochs = int(cfg.trainer.max_epochs)
    lr = float(cfg.optimizer.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(cfg.optimizer.weight_decay))
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=float(cfg.scheduler.pct_start))
    weight = weight.to(setup.device) if weight is not None else None
    model.train()
    sync(setup.device)
    started = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = prepare(x.to(setup.device, non_blocking=True)), y.to(setup.device, non_blocking=True)
            with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    sync(setup.device)
    return time.perf_counter() - started


@torch.no_grad()
def _predict(
    model: torch.nn.Module, loader: DataLoader, setup: Setup, prepare: Prepare, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=bf16):
            probs.append(model(prepare(x.to(setup.device))).float().softmax(1)[:, 1].cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


# ---- (b) the seed projects' way: ImageFolder + DataLoader decoding JPEGs every epoch, one model after another ----
def seed_style(setup: Setup) -> Result:
    cfg, root = setup.cfg, Path(setup.cfg.data.root)
    size, aug = int(cfg.data.image_size), cfg.data.augment
    ops = [T.Grayscale(1), T.Resize((size, size))]
    if aug.enabled:
        ops += [
            T.RandomHorizontalFlip(float(aug.hflip)),
            T.RandomAffine(float(aug.degrees), translate=(float(aug.translate),) * 2, scale=tuple(aug.scale)),
            T.ColorJitter(contrast=float(aug.contrast)),
        ]
    tail = [T.ToTensor(), T.Normalize([0.5], [0.25])]
    started = time.perf_counter()
    train_set = datasets.ImageFolder(str(root / "train"), T.Compose(ops + tail))
    test_set = datasets.ImageFolder(str(root / "test"), T.Compose([T.Grayscale(1), T.Resize((size, size)), *tail]))
    bs, workers = int(cfg.data.batch_size), setup.train_workers
    loader = DataLoader(train_set, bs, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=False)
    test_loader = DataLoader(test_set, bs, num_workers=workers)
    weight = class_weights(torch.as_tensor(train_set.targets)) if cfg.data.balance == "weights" else None

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, int(cfg.model.in_chans), -1, -1)
        return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x

    train_s, aurocs = train_each(setup, setup.branches, loader, test_loader, weight, prepare)
    return Result("b", time.perf_counter() - started, 0.0, train_s, aurocs, len(train_set))


# ---- (c) a lean plain loop over tensors decoded once, one model after another ------------------------------------
def _decode_split(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    paths, labels = [], []
    for label, c in enumerate(CLASSES):
        files = image_files(folder / c)
        paths += files
        labels += [label] * len(files)
    images, ok, _ = decode_images(paths, size)
    return images, torch.as_tensor([labels[i] for i in ok])


def lean_loop(setup: Setup, branches: Sequence[str] | None = None, name: str = "c") -> Result:
    cfg, root = setup.cfg, Path(setup.cfg.data.root)
    size, bs = int(cfg.data.image_size), int(cfg.data.batch_size)
    started = time.perf_counter()
    train_x, train_y = _decode_split(root / "train", size)
    test_x, test_y = _decode_split(root / "test", size)
    decode_s = time.perf_counter() - started
    augment = build_augment(OmegaConf.to_container(cfg.data.augment))
    loader = DataLoader(TensorDataset(train_x, train_y, augment), bs, shuffle=True, drop_last=True)
    test_loader = DataLoader(TensorDataset(test_x, test_y), bs)
    weight = class_weights(train_y) if cfg.data.balance == "weights" else None

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() / 255.0 - 0.5) / 0.25).expand(-1, int(cfg.model.in_chans), -1, -1)
        return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x

    train_s, aurocs = train_each(setup, branches or setup.branches, loader, test_loader, weight, prepare)
    return Result(name, time.perf_counter() - started, decode_s, train_s, aurocs, len(train_y))
