"""Checkpoints that survive a kill during the write and load without pickle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from xrayfusion.core.errors import DataError

LAST = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the target's folder, fsync, then os.replace: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint gets the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with an atomic write (temp file in the same folder + os.replace)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (no code can run); a clear DataError when it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise DataError(f"checkpoint {path} does not exist") from err
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise DataError(
            f"checkpoint {path} cannot be loaded safely (weights_only=True): {str(err).splitlines()[0]}"
        ) from err


def last_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The `last.ckpt` that ModelCheckpoint rewrites every epoch, when present."""
    path = Path(checkpoint_dir) / LAST
    return path if path.is_file() else None
