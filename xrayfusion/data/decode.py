"""Decode image files (JPEG, PNG 8/16-bit, grey or RGB, DICOM) once into uint8 grey tensors at a fixed size."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
CACHE_VERSION = 1  # bump when decoding changes, so old cache files are not reused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A file (or a folder, or a CSV row) that could not be used, with the reason."""

    path: str
    reason: str


def is_dicom(path: Path) -> bool:
    """A `.dcm`/`.dicom` suffix, or the 'DICM' preamble magic of suffix-less hospital exports."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def load_grey(path: str | Path, size: int) -> np.ndarray:
    """Read one image as a (size, size) uint8 grey array; raises ValueError with a reason."""
    return _load(path, size)[0]


def load_grey_bytes(data: bytes, size: int) -> np.ndarray:
    """The bytes of an image file (PNG, JPEG, ..., or DICOM) as a (size, size) uint8 grey array, decoded exactly
    as the file would be; raises ValueError with a reason."""
    if not data:
        raise ValueError("zero-byte image")
    return _decode(io.BytesIO(data), data[128:132] == b"DICM", size)[0]


def _load(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The (size, size) uint8 grey array and the file's original (width, height)."""
    path = Path(path)
    if not path.exists():
        raise ValueError("file not found")
    if path.stat().st_size == 0:
        raise ValueError("zero-byte file")
    return _decode(path, is_dicom(path), size)


def _decode(source: Path | io.BytesIO, dicom: bool, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    if dicom:
        grey = Image.fromarray(read_dicom(source), mode="L")
    else:
        try:
            with Image.open(source) as img:
                img.load()
                grey = _to_grey(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot decode image ({err})") from err
    original = grey.size
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(grey, dtype=np.uint8), original


def _scale_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map [lo, hi] (the image's own range by default) linearly onto 0..255."""
    arr = np.asarray(arr, dtype=np.float64)
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)


def _to_grey(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit or wider: stretch to 8 bits
        return Image.fromarray(_scale_to_uint8(np.asarray(img)), mode="L")
    return img.convert("L")


def read_dicom(path: str | Path | io.BytesIO) -> np.ndarray:
    """A DICOM image as uint8 grey: rescale slope/intercept (modality LUT), the file's VOI LUT or window when
    present (else the image's own range), MONOCHROME1 inverted; first frame of multi-frame files."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except (InvalidDicomError, AttributeError, KeyError, ValueError, RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"cannot decode DICOM ({type(err).__name__}: {err})") from err
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour DICOM (secondary captures): mean of the channels
        return _scale_to_uint8(arr.astype(np.float64).mean(-1), 0.0, float(2 ** int(ds.get("BitsStored", 8)) - 1))
    values = apply_modality_lut(arr, ds)
    lo = hi = None
    if ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds):
        values = apply_voi_lut(values, ds)
        # the window's output range: what the lowest and highest possible inputs map to
        probe = apply_voi_lut(np.array([-(2**31), 2**31 - 1], dtype=np.int64), ds)
        lo, hi = float(np.min(probe)), float(np.max(probe))
    grey = _scale_to_uint8(values, lo, hi)
    return 255 - grey if photometric == "MONOCHROME1" else grey


@dataclass
class Decoded:
    """Images of the files that decoded (N_ok, 1, size, size), their indices into the input, original
    (width, height) per decoded file, and the failures."""

    images: torch.Tensor
    ok: list[int]
    sizes: list[tuple[int, int]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def cache_key(paths: Sequence[str | Path], size: int) -> str:
    """A digest of the file list with each file's byte size and mtime, the output size and the decoder version."""
    entries = []
    for p in paths:
        try:
            st = os.stat(p)
            entries.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            entries.append((str(p), -1, -1))
    blob = json.dumps([CACHE_VERSION, size, entries]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _read_cache(path: Path) -> Decoded | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return Decoded(
            blob["images"],
            list(blob["ok"]),
            [tuple(s) for s in blob["sizes"]],
            [Failure(p, r) for p, r in blob["failures"]],
        )
    except Exception as err:  # a cache file cut short or from another version is only a miss
        log.warning("ignoring unreadable decode cache %s (%s)", path, err)
        return None


def _write_cache(path: Path, decoded: Decoded) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    blob = {
        "images": decoded.images,
        "ok": decoded.ok,
        "sizes": [list(s) for s in decoded.sizes],
        "failures": [[f.path, f.reason] for f in decoded.failures],
    }
    torch.save(blob, tmp)
    os.replace(tmp, path)


def decode_files(
    paths: Sequence[str | Path], size: int, workers: int = 2, cache_dir: str | Path | None = None
) -> Decoded:
    """Decode `paths` once; with `cache_dir`, reuse the result of the same files (same sizes and mtimes)."""
    cache_file = Path(cache_dir) / f"decoded-{cache_key(paths, size)}.pt" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached

    def one(p: str | Path) -> tuple[np.ndarray, tuple[int, int]] | Failure:
        try:
            return _load(p, size)
        except ValueError as err:
            return Failure(str(p), str(err))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, paths))
    ok = [i for i, r in enumerate(results) if not isinstance(r, Failure)]
    if ok:
        images = torch.from_numpy(np.stack([results[i][0] for i in ok])[:, None])
    else:
        images = torch.empty((0, 1, size, size), dtype=torch.uint8)
    decoded = Decoded(images, ok, [tuple(results[i][1]) for i in ok], [r for r in results if isinstance(r, Failure)])
    if cache_file is not None:
        _write_cache(cache_file, decoded)
    return decoded


def decode_images(
    paths: Sequence[str | Path], size: int, workers: int = 2
) -> tuple[torch.Tensor, list[int], list[Failure]]:
    """Decode `paths` into a (N_ok, 1, size, size) uint8 tensor.

    Returns the tensor, the indices of `paths` that decoded, and the failures.
    """
    decoded = decode_files(paths, size, workers)
    return decoded.images, decoded.ok, decoded.failures
