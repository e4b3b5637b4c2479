"""Speed and quality benchmarks of xrayfusion; prints markdown tables (docs/benchmarks.md holds them).

    python scripts/benchmark.py speed     # (a) joint vs (b) seed-style ImageFolder loops vs (c) lean loops, (d)
    python scripts/benchmark.py switches  # precision x channels-last x compile x workers for joint training
    python scripts/benchmark.py precision # per branch: float32 vs bfloat16 step time (model.bf16_branches)
    python scripts/benchmark.py profile   # where the time of one joint training step goes (torch.profiler)
    python scripts/benchmark.py quality   # trains experiment=kermany_cpu, prints the Kermany test table
    python scripts/benchmark.py speed --device cuda   # GPU: bf16 + channels-last at 224 px

Every contender trains the same models (timm, 1-channel input, fresh weights), at the same image size, batch size
and epochs, on the same files, with the same optimizer (AdamW + one-cycle), class-weighted loss and augmentation
taken from the composed xrayfusion config. Contenders alternate within each round so machine drift hits all.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's xrayfusion, not another installed copy

import timm  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from xrayfusion.data.datamodule import XRayDataModule  # noqa: E402
from xrayfusion.data.decode import IMAGE_SUFFIXES, decode_images  # noqa: E402
from xrayfusion.data.transforms import TensorDataset, build_augment  # noqa: E402
from xrayfusion.models import FusionClassifier  # noqa: E402
from xrayfusion.models.module import bf16_branch_indices  # noqa: E402
from xrayfusion.models.precision import autotune_bf16, choose_bf16_branches, time_branches  # noqa: E402
from xrayfusion.core.runtime import configure_torch  # noqa: E402
from xrayfusion.training.factory import build_model  # noqa: E402

DEFAULT_ROOT = os.environ.get("XRAYFUSION_KERMANY_ROOT", str(REPO.parent / "shared" / "data" / "chest_xray_224"))
CLASSES = ("NORMAL", "PNEUMONIA")


# ---- data: one subset of files, in the ImageFolder layout, shared by every contender -----------------------------
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def make_subset_root(root: Path, out: Path, max_train: int | None, max_test: int | None, seed: int) -> dict[str, int]:
    """Symlink a stratified subset of ROOT/{train,test} into OUT/{train,val,test}/<class>/ (val: 4 per class,
    taken out of train, only because xrayfusion's data module wants one; no contender trains on it)."""
    rng = random.Random(seed)
    counts = {}
    for split, limit in (("train", max_train), ("test", max_test)):
        per_class = {c: _files(root / split / c) for c in CLASSES}
        total = sum(len(v) for v in per_class.values())
        for c, files in per_class.items():
            rng.shuffle(files)
            if split == "train":
                val, files = files[:4], files[4:]
                _link(val, out / "val" / c)
            if limit is not None and limit < total:
                files = files[: max(2, round(limit * len(files) / total))]
            _link(files, out / split / c)
            counts[f"{split}/{c}"] = len(files)
    return counts


def _link(files: Sequence[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())


def compose_cfg(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# ---- settings shared by the contenders ---------------------------------------------------------------------------
@dataclass
class Setup:
    cfg: DictConfig  # composed xrayfusion config (data.root points at the subset)
    device: torch.device
    train_workers: int = 0  # workers of the seed-style ImageFolder loader (it decodes JPEGs)

    @property
    def branches(self) -> list[str]:
        return list(self.cfg.model.branches)

    @property
    def bf16(self) -> bool:
        return str(self.cfg.trainer.precision).startswith("bf16")

    def bf16_for(self, branch: str) -> bool:
        """bfloat16 autocast for this model: trainer.precision=bf16-* or the branch is in model.bf16_branches."""
        chosen = bf16_branch_indices(self.branches, self.cfg.model.get("bf16_branches"))
        return self.bf16 or branch in [self.branches[i] for i in chosen]

    @property
    def channels_last(self) -> bool:
        return bool(self.cfg.model.channels_last)


@dataclass
class Result:
    name: str
    wall_s: float
    decode_s: float
    train_s: dict[str, float]
    auroc: dict[str, float]
    n_images: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total_train_s(self) -> float:
        return sum(self.train_s.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _auroc(labels: torch.Tensor, probs: torch.Tensor) -> float:
    return float(roc_auc_score(labels.numpy(), probs.float().numpy()))


def _plain_model(name: str, setup: Setup) -> torch.nn.Module:
    model = timm.create_model(name, in_chans=int(setup.cfg.model.in_chans), num_classes=2).to(setup.device)
    return model.to(memory_format=torch.channels_last) if setup.channels_last else model


def _class_weights(labels: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=2).float()
    return counts.sum() / (counts.clamp(min=1) * len(counts))


def _plain_train(
    model: torch.nn.Module,
    batches: Callable[[], object],
    steps_per_epoch: int,
    setup: Setup,
    weight: torch.Tensor | None,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    bf16: bool = False,
) -> float:
    """Train `model` for the configured epochs with AdamW + one-cycle (bf16: autocast); returns seconds."""
    cfg = setup.cfg
    epochs = int(cfg.trainer.max_epochs)
    lr = float(cfg.optimizer.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(cfg.optimizer.weight_decay))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=float(cfg.scheduler.pct_start))
    weight = weight.to(setup.device) if weight is not None else None
    model.train()
    _sync(setup.device)
    started = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches():
            x, y = prepare(x.to(setup.device, non_blocking=True)), y.to(setup.device, non_blocking=True)
            with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    _sync(setup.device)
    return time.perf_counter() - started


@torch.no_grad()
def _plain_predict(
    model: torch.nn.Module, loader: DataLoader, setup: Setup, prepare: Callable, bf16: bool = False
) -> tuple:
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
    weight = _class_weights(torch.as_tensor(train_set.targets)) if cfg.data.balance == "weights" else None

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, int(cfg.model.in_chans), -1, -1)
        return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x

    train_s, auroc = {}, {}
    for name in setup.branches:
        model, bf16 = _plain_model(name, setup), setup.bf16_for(name)
        train_s[name] = _plain_train(model, lambda: loader, len(loader), setup, weight, prepare, bf16)
        auroc[name] = _auroc(*reversed(_plain_predict(model, test_loader, setup, prepare, bf16)))
    return Result("b", time.perf_counter() - started, 0.0, train_s, auroc, len(train_set))


# ---- (c) a lean plain loop over tensors decoded once, one model after another ------------------------------------
def _decode_split(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    paths, labels = [], []
    for label, c in enumerate(CLASSES):
        files = _files(folder / c)
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
    weight = _class_weights(train_y) if cfg.data.balance == "weights" else None

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() / 255.0 - 0.5) / 0.25).expand(-1, int(cfg.model.in_chans), -1, -1)
        return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x

    train_s, auroc = {}, {}
    for branch in branches or setup.branches:
        model, bf16 = _plain_model(branch, setup), setup.bf16_for(branch)
        train_s[branch] = _plain_train(model, lambda: loader, len(loader), setup, weight, prepare, bf16)
        auroc[branch] = _auroc(*reversed(_plain_predict(model, test_loader, setup, prepare, bf16)))
    return Result(name, time.perf_counter() - started, decode_s, train_s, auroc, len(train_y))


# ---- (a) xrayfusion: every branch trained on each batch, Lightning Trainer from the composed config --------------
def xrayfusion_joint(setup: Setup, branches: Sequence[str] | None = None, name: str = "a") -> Result:
    cfg = setup.cfg.copy()
    if branches is not None:
        cfg.model.branches = list(branches)
        chosen = bf16_branch_indices(setup.branches, cfg.model.get("bf16_branches"))
        cfg.model.bf16_branches = [setup.branches[i] for i in chosen if setup.branches[i] in branches]
    started = time.perf_counter()
    dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    source = dm.prepare()
    decode_s = time.perf_counter() - started
    model = build_model(cfg, dm)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(
        accelerator=setup.device.type if setup.device.type != "cuda" else "gpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer = instantiate(trainer_cfg)
    fit_started = time.perf_counter()
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    _sync(setup.device)
    fit_s = time.perf_counter() - fit_started
    model.to(setup.device)
    with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.bf16):
        probs, labels = model.predict_loader(dm.loader("test"))
    auroc = {b: _auroc(labels, probs[:, i, 1]) for i, b in enumerate(cfg.model.branches)}
    if len(auroc) > 1:
        auroc["fused (average)"] = _auroc(labels, probs[:, :, 1].mean(1))
    return Result(name, time.perf_counter() - started, decode_s, {"joint": fit_s}, auroc, len(source.train))


# ---- speed -------------------------------------------------------------------------------------------------------
def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def speed(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="xrayfusion-bench-") as tmp:
        counts = make_subset_root(Path(args.data_root), Path(tmp), args.max_train, args.max_test, args.seed)
        cfg = compose_cfg(_speed_overrides(args, tmp))
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
        _print_setup(args, cfg, counts, device)
        results: dict[str, list[Result]] = {c: [] for c in chosen}
        for r in range(args.rounds):
            order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]  # rotate so no contender is always first
            for c in order:
                torch.manual_seed(args.seed + r)
                res = contenders[c]()
                results[c].append(res)
                print(f"round {r + 1} {c}: wall {res.wall_s:.1f} s, train {res.total_train_s:.1f} s", flush=True)
        print_speed(results, setup, args.epochs)


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


def _speed_overrides(args: argparse.Namespace, root: str) -> list[str]:
    gpu = args.device.startswith("cuda")
    size = args.image_size or (224 if gpu else 64)
    overrides = [
        "data=kermany",
        f"data.root={root}",
        f"data.image_size={size}",
        f"data.batch_size={args.batch_size}",
        "data.balance=weights",
        f"model.branches=[{','.join(args.branches)}]",
        f"trainer.max_epochs={args.epochs}",
        "fusion=average",
    ]
    if args.precision or gpu:
        overrides.append(f"trainer.precision={args.precision or 'bf16-mixed'}")
    if args.channels_last is not None or gpu:
        channels_last = args.channels_last if args.channels_last is not None else True
        overrides.append(f"model.channels_last={str(channels_last).lower()}")
    if args.threads:
        overrides.append(f"runtime.threads={args.threads}")
    return overrides + list(args.overrides)


def _print_setup(args: argparse.Namespace, cfg: DictConfig, counts: dict[str, int], device: torch.device) -> None:
    configure_torch(cfg.runtime.threads, cfg.runtime.matmul_precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(
        f"branches {list(cfg.model.branches)}, {cfg.data.image_size} px, batch {cfg.data.batch_size}, "
        f"{cfg.trainer.max_epochs} epoch(s), precision {cfg.trainer.precision}, "
        f"channels_last {cfg.model.channels_last}, bf16_branches {cfg.model.get('bf16_branches')}, "
        f"compile {cfg.model.compile}; files {counts}; "
        f"rounds {args.rounds}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(os.sched_getaffinity(0))} CPUs"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


LABELS = {
    "a": "(a) xrayfusion, K branches jointly",
    "b": "(b) seed style: ImageFolder + JPEG decode every epoch, one model after another",
    "c": "(c) lean plain loop over decoded tensors, one model after another",
    "d": "(d) xrayfusion, one branch",
}


def print_speed(results: dict[str, list[Result]], setup: Setup, epochs: int) -> None:
    print("\n| contender | wall s | decode s | train s | images/s | test auroc |")
    print("|---|---|---|---|---|---|")
    med = {}
    for c, runs in results.items():
        wall = _median([r.wall_s for r in runs])
        train = _median([r.total_train_s for r in runs])
        decode = _median([r.decode_s for r in runs])
        n = runs[0].n_images
        k = 1 if c == "d" else len(setup.branches)
        med[c] = (wall, train)
        aurocs = {m: _median([r.auroc[m] for r in runs]) for m in runs[0].auroc}
        auroc_text = ", ".join(f"{m} {v:.3f}" for m, v in aurocs.items())
        per_model = ""
        if len(runs[0].train_s) > 1:
            parts = [f"{m} {_median([r.train_s[m] for r in runs]):.1f}" for m in runs[0].train_s]
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
        lean_first = _median([r.train_s[first] for r in results["c"]])
        print(f"| (d) framework overhead, {first}: xrayfusion / lean train | {med['d'][1] / lean_first:.2f}x |")


# ---- switches: which speed settings pay off on this machine ------------------------------------------------------
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


def switches(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="xrayfusion-bench-") as tmp:
        counts = make_subset_root(Path(args.data_root), Path(tmp), args.max_train, args.max_test, args.seed)
        base = [
            *_speed_overrides(args, tmp),
            "trainer.precision=32-true",
            "model.channels_last=false",
            "data.num_workers=0",
        ]
        chosen = {k: v for k, v in SWITCHES.items() if k in args.settings}
        setups = {k: Setup(compose_cfg([*base, *v]), device) for k, v in chosen.items()}
        _print_setup(args, next(iter(setups.values())).cfg, counts, device)
        times: dict[str, list[float]] = {k: [] for k in chosen}
        for r in range(args.rounds):
            for k in list(chosen)[r % len(chosen) :] + list(chosen)[: r % len(chosen)]:
                res = xrayfusion_joint(setups[k])
                times[k].append(res.total_train_s)
                print(f"round {r + 1} {k}: train {res.total_train_s:.1f} s", flush=True)
                n = res.n_images
        ref = _median(times[next(iter(chosen))])
        print("\n| setting | train s | images/s | speed-up |")
        print("|---|---|---|---|")
        for k, ts in times.items():
            t = _median(ts)
            print(f"| {k} | {t:.1f} | {n * args.epochs / t:.0f} | {ref / t:.2f}x |")


# ---- precision: which branches train faster in bfloat16 on this machine -----------------------------------------
def precision(args: argparse.Namespace) -> None:
    """Per branch: a training step in float32 vs bfloat16 autocast, timed as model.bf16_branches=auto times it."""
    from xrayfusion.runtime import cpu_bf16_support

    device = torch.device(args.device)
    size = args.image_size or (224 if device.type == "cuda" else 64)
    configure_torch(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"device: {device} ({name}; bf16 units: {cpu_bf16_support() if device.type == 'cpu' else 'gpu'}); "
        f"torch {torch.__version__}; threads {torch.get_num_threads()}"
    )
    channels_last = args.channels_last if args.channels_last is not None else True
    print(
        f"{size} px, batch {args.batch_size}, channels_last {channels_last}; per branch: forward + loss + backward, "
        f"2 warm-up steps per precision, then the fastest of {args.steps} alternating float32/bf16 pairs",
        flush=True,
    )
    torch.manual_seed(args.seed)
    model = FusionClassifier(list(args.branches), 2, {"name": "average"}, image_size=size, channels_last=channels_last)
    timings = time_branches(model, args.batch_size, size, device, steps=args.steps)
    print("\n| branch | float32 ms/step | bf16 ms/step | bf16 speed-up |")
    print("|---|---|---|---|")
    for t in timings:
        print(f"| {t.branch} | {1000 * t.fp32_s:.0f} | {1000 * t.bf16_s:.0f} | {t.speedup:.2f}x |")
    print(f"\n>= 1.1x faster in bf16 here: model.bf16_branches=[{','.join(choose_bf16_branches(timings))}]")


# ---- profile: where the time of joint training goes -------------------------------------------------------------
def profile_run(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="xrayfusion-bench-") as tmp:
        counts = make_subset_root(Path(args.data_root), Path(tmp), args.max_train, args.max_test, args.seed)
        setup = Setup(compose_cfg(_speed_overrides(args, tmp)), device)
        _print_setup(args, setup.cfg, counts, device)
        cfg = setup.cfg
        dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
        dm.prepare()
        model = build_model(cfg, dm).to(device)
        opt = model.optimizer_factory(model.parameters())
        loader = dm.train_dataloader()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        phases = {"data (augment + collate)": 0.0, "forward + loss": 0.0, "backward": 0.0, "optimizer": 0.0}
        with profile(activities=activities) as prof:
            it = iter(loader)
            for _ in range(min(args.steps, len(loader))):
                t0 = time.perf_counter()
                with record_function("data"):
                    x, y = next(it)
                    x, y = x.to(device), y.to(device)
                t1 = time.perf_counter()
                with record_function("forward"), torch.autocast(device.type, torch.bfloat16, enabled=setup.bf16):
                    loss = model._loss(model(x), y)
                _sync(device)
                t2 = time.perf_counter()
                with record_function("backward"):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                _sync(device)
                t3 = time.perf_counter()
                with record_function("optimizer"):
                    opt.step()
                _sync(device)
                t4 = time.perf_counter()
                for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[key] += dt
        total = sum(phases.values())
        print(f"\n{args.steps} training steps, {total:.1f} s (profiler on; relative shares are what matter)\n")
        print("| phase | s | share |")
        print("|---|---|---|")
        for key, dt in phases.items():
            print(f"| {key} | {dt:.2f} | {100 * dt / total:.0f}% |")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print("\n```\n" + prof.key_averages().table(sort_by=sort, row_limit=args.top) + "\n```")


# ---- quality -----------------------------------------------------------------------------------------------------
def quality(args: argparse.Namespace) -> None:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="xrayfusion-quality-") as tmp:
        uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        cmd = [
            sys.executable,
            "-m",
            "xrayfusion.train",
            f"experiment={args.experiment}",
            f"data.root={args.data_root}",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={tmp}/run",
            f"paths.mlruns_dir={tmp}/mlruns",
            *args.overrides,
        ]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
        print("$", " ".join(cmd[1:]), flush=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=REPO)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"training failed (exit {done.returncode})")
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("xrayfusion")
        run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
        print_quality(run.data.metrics, run.data.params, wall)


ANCHORS = [
    ("Kermany et al. 2018 (Cell), transfer learning", 0.928, 0.968),
    ("MedMNIST+ ResNet-18, 224 px", 0.911, 0.980),
    ("Google AutoML Vision on PneumoniaMNIST", 0.946, 0.991),
]


def print_quality(metrics: dict[str, float], params: dict[str, str], wall: float) -> None:
    names = sorted(
        {k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2},
        key=lambda n: (n == "fused", n),
    )
    fusion = params.get("fusion/name", "?")
    n_test = params.get("data/n_test", "?")
    rule, chosen = params.get("metrics/threshold", "?"), params.get("threshold/fused")
    threshold = f"{rule} (fused: {float(chosen):.3f}, chosen on validation)" if chosen else rule
    print(f"\nKermany test set ({n_test} images); fusion {fusion}; threshold {threshold}")
    print("\n| model | acc | sensitivity | specificity | f1 | auroc |")
    print("|---|---|---|---|---|---|")
    for n in names:
        row = [metrics.get(f"test/{n}/{m}", float("nan")) for m in ("acc", "recall", "specificity", "f1", "auroc")]
        label = f"fused ({fusion})" if n == "fused" else n
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    for title, acc, auroc in ANCHORS:
        print(f"| {title} | {acc:.3f} | | | | {auroc:.3f} |")
    weights = {k.split("weight_", 1)[1]: v for k, v in params.items() if k.startswith("average/weight_")}
    if weights:
        print("\nlearned average weights: " + ", ".join(f"{k} {float(v):.3f}" for k, v in weights.items()))
    fit = metrics.get("time/fit_seconds", float("nan"))
    print(f"\nfit {fit:.0f} s, end to end {wall:.0f} s (decode, fit, fusion, test, MLflow logging)")


# ---- command line ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "switches", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--data-root", default=DEFAULT_ROOT, help="Kermany folder with train/ and test/")
        p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16 + channels-last at 224 px)")
        p.add_argument("--branches", nargs="+", default=["resnet18", "mobilenetv2_100"])
        p.add_argument("--image-size", type=int, default=None, help="default 64 on CPU, 224 on GPU")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--epochs", type=int, default=1)
        p.add_argument("--max-train", type=int, default=None, help="stratified subset of train/ (default all)")
        p.add_argument("--max-test", type=int, default=None, help="stratified subset of test/ (default all)")
        p.add_argument("--rounds", type=int, default=2, help="contenders alternate within each round")
        p.add_argument("--precision", default=None, help="trainer.precision for every contender")
        p.add_argument("--channels-last", default=None, type=lambda s: s.lower() in ("1", "true", "yes"))
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("overrides", nargs="*", help="extra xrayfusion config overrides, e.g. data.num_workers=1")
    sp = sub.choices["speed"]
    sp.add_argument("--contenders", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    sp.add_argument("--seed-workers", type=int, default=min(2, os.cpu_count() or 1), help="workers of (b)")
    sub.choices["switches"].add_argument("--settings", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    sub.choices["profile"].add_argument("--steps", type=int, default=20)
    sub.choices["profile"].add_argument("--top", type=int, default=15, help="rows of the operator table")
    pp = sub.add_parser("precision")
    pp.add_argument("--device", default="cpu")
    pp.add_argument("--branches", nargs="+", default=["resnet18", "mobilenetv2_100", "efficientnet_lite0", "small_cnn"])
    pp.add_argument("--image-size", type=int, default=None, help="default 64 on CPU, 224 on GPU")
    pp.add_argument("--batch-size", type=int, default=32)
    pp.add_argument("--steps", type=int, default=5, help="alternating float32/bf16 pairs after the warm-up")
    pp.add_argument("--channels-last", default=None, type=lambda s: s.lower() in ("1", "true", "yes"))
    pp.add_argument("--threads", type=int, default=None)
    pp.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("quality")
    q.add_argument("--experiment", default="kermany_cpu")
    q.add_argument("--data-root", default=DEFAULT_ROOT)
    q.add_argument("--tracking-uri", default=None, help="default: a throw-away SQLite store")
    q.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args(argv)
    commands = {
        "speed": speed,
        "switches": switches,
        "profile": profile_run,
        "precision": precision,
        "quality": quality,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
