"""What several subcommands share: the file subset, the composed config, Setup/Result, the common flags and
the setup line every table is printed under."""

from __future__ import annotations

import argparse
import os
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from sklearn.metrics import roc_auc_score

from xrayfusion.core.cli import CONFIG_DIR
from xrayfusion.core.runtime import configure_torch
from xrayfusion.data.decode import IMAGE_SUFFIXES
from xrayfusion.models.module import bf16_branch_indices

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = os.environ.get("XRAYFUSION_KERMANY_ROOT", str(REPO.parent / "shared" / "data" / "chest_xray_224"))
CLASSES = ("NORMAL", "PNEUMONIA")


# ---- data: one subset of files, in the ImageFolder layout, shared by every contender -----------------------------
def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def make_subset_root(root: Path, out: Path, max_train: int | None, max_test: int | None, seed: int) -> dict[str, int]:
    """Symlink a stratified subset of ROOT/{train,test} into OUT/{train,val,test}/<class>/ (val: 4 per class,
    taken out of train, only because xrayfusion's data module wants one; no contender trains on it)."""
    rng = random.Random(seed)
    counts = {}
    for split, limit in (("train", max_train), ("test", max_test)):
        per_class = {c: image_files(root / split / c) for c in CLASSES}
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
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def auroc(labels: torch.Tensor, probs: torch.Tensor) -> float:
    return float(roc_auc_score(labels.numpy(), probs.float().numpy()))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---- the flags and config overrides of speed, switches and profile -----------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--channels-last", default=None, type=parse_bool)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="extra xrayfusion config overrides, e.g. data.num_workers=1")


def parse_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def speed_overrides(args: argparse.Namespace, root: str) -> list[str]:
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


def print_setup(args: argparse.Namespace, cfg: DictConfig, counts: dict[str, int], device: torch.device) -> None:
    configure_torch(cfg.runtime.threads, cfg.runtime.matmul_precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(
        f"branches {list(cfg.model.branches)}, {cfg.data.image_size} px, batch {cfg.data.batch_size}, "
        f"{cfg.trainer.max_epochs} epoch(s), precision {cfg.trainer.precision}, "
        f"channels_last {cfg.model.channels_last}, bf16_branches {cfg.model.get('bf16_branches')}, "
        f"compile {cfg.model.compile}; files {counts}; "
        f"rounds {args.rounds}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(os.sched_getaffinity(0))} CPUs"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"
