"""Where a backbone's ImageNet weights come from: a local folder or timm's Hugging Face hub (cached).

Every source ends as a file that timm itself loads (`pretrained_cfg_overlay=dict(file=...)`), so timm's
first-layer adaptation (`in_chans=1` sums the RGB filters) and classifier dropping apply the same way.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from xrayfusion.core.errors import ConfigError
from xrayfusion.models.cnns import PROJECT_CNNS

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # the files timm's hub repositories hold
_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PretrainedWeights:
    """A weights file for one backbone and where it came from (`file` or `hf-hub:<repo>`)."""

    path: Path
    source: str

    def describe(self) -> str:
        return str(self.path) if self.source == "file" else f"{self.source} ({self.path})"


def has_pretrained(name: str) -> bool:
    """False for the project's own CNNs, which have no ImageNet weights."""
    return name.split(".", 1)[0] not in PROJECT_CNNS


def _matches(stem: str, name: str) -> bool:
    # resnet18.pth, resnet18_imagenet.pth, resnet18.a1_in1k.pth match resnet18; resnet18d.pth does not
    return stem == name or (stem.startswith(name) and stem[len(name)] in "._-")


def find_weights_file(name: str, weights_dir: str | Path) -> Path:
    """The file `DIR/<name>*.pth|.safetensors` for backbone `name`; ConfigError naming the file when missing."""
    folder = Path(weights_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.weights_dir={weights_dir!s} is not a folder; create it and put {name}.pth in it")
    found = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES and _matches(p.stem, name)
    )
    exact = [p for p in found if p.stem == name]
    if exact:
        found = exact
    if not found:
        raise ConfigError(
            f"no ImageNet weights for backbone {name!r} in model.weights_dir={weights_dir!s}: put a state dict "
            f"file {folder.resolve() / (name + '.pth')} (or {name}*.pth / {name}*.safetensors there), or set "
            f"model.pretrained=false"
        )
    if len(found) > 1:
        raise ConfigError(
            f"several weight files match backbone {name!r} in {folder}: {', '.join(p.name for p in found)}; "
            f"keep one or rename it to {name}.pth"
        )
    return found[0].resolve()


def _hub_repo(name: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None else None


def _hub_reachable(endpoint: str) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_weights(name: str) -> PretrainedWeights:
    """timm's hub weights for `name`: from the Hugging Face cache, else downloaded; ConfigError when offline."""
    import huggingface_hub
    from huggingface_hub import constants

    repo = _hub_repo(name)
    if not repo:
        raise ConfigError(
            f"timm has no pretrained weights for backbone {name!r}; set model.pretrained=false for it, or put "
            f"a state dict {name}.pth in a folder and pass model.weights_dir=FOLDER"
        )
    for filename in _HUB_FILES:
        cached = huggingface_hub.try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return PretrainedWeights(Path(cached), f"hf-hub:{repo}")
    if not _hub_reachable(constants.ENDPOINT):
        raise ConfigError(
            f"no ImageNet weights for backbone {name!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot be "
            f"reached and {repo} is not in the cache. Offline, put a state dict file {name}.pth (or "
            f"{name}*.safetensors, e.g. {constants.ENDPOINT}/{repo}/resolve/main/{_HUB_FILES[0]} renamed) in a "
            f"folder and pass model.weights_dir=FOLDER, or set model.pretrained=false"
        )
    errors = []
    for filename in _HUB_FILES:
        try:
            return PretrainedWeights(Path(huggingface_hub.hf_hub_download(repo, filename)), f"hf-hub:{repo}")
        except (huggingface_hub.errors.EntryNotFoundError, OSError) as err:  # try the other file name
            errors.append(f"{filename}: {err}")
    raise ConfigError(f"could not download ImageNet weights for {name!r} from {repo}: {'; '.join(errors)}")


def resolve_weights(name: str, weights_dir: str | Path | None = None) -> PretrainedWeights | None:
    """The weights `model.pretrained=true` loads for `name`; None for project CNNs (trained from scratch)."""
    if not has_pretrained(name):
        return None
    if weights_dir:
        return PretrainedWeights(find_weights_file(name, weights_dir), "file")
    return hub_weights(name)


def _torch_load(path: Path) -> object:
    try:  # memory-mapped: only the names are needed here
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def file_keys(path: Path) -> set[str]:
    """Tensor names of a plain state dict file (safetensors or torch, read with weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    else:
        try:
            state = _torch_load(path)
        except Exception as err:  # noqa: BLE001  (unpickling errors of files that are not plain tensors)
            raise ConfigError(f"{path} is not a plain state dict (torch.load weights_only=True failed: {err})") from err
        if not isinstance(state, dict):
            raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        state = state.get("state_dict", state.get("model", state))
        keys = set(state)
    return {k.removeprefix("module.") for k in keys}
