from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_image
from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.data import XRayDataModule, build_source
from xrayfusion.data.sources import load_folder_source, load_medmnist, make_synthetic


def test_kermany_folder_is_decoded_once_and_split_by_patient(kermany_root: Path) -> None:
    data = build_source({"name": "kermany", "root": str(kermany_root), "image_size": 32, "val_fraction": 0.25})
    assert data.class_names == ["NORMAL", "PNEUMONIA"]
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 32, 32)
    assert len(data.train) + len(data.val) == 48 and len(data.test) == 16
    assert set(data.train.groups).isdisjoint(data.val.groups)
    assert set(data.val.labels.tolist()) == {0, 1}


def test_existing_val_folder_is_used(kermany_root: Path) -> None:
    write_image(kermany_root / "val" / "NORMAL" / "IM-9000-0001.jpeg", 0)
    write_image(kermany_root / "val" / "PNEUMONIA" / "person900_virus_1.jpeg", 1)
    data = load_folder_source(kermany_root, 32, 0.2, 0)
    assert len(data.val) == 2 and len(data.train) == 48


def test_unreadable_image_is_skipped_and_reported(kermany_root: Path) -> None:
    (kermany_root / "train" / "NORMAL" / "IM-0999-0001.jpeg").write_bytes(b"")
    (kermany_root / "train" / "NORMAL" / "IM-0998-0001.jpeg").write_bytes(b"not a jpeg")
    data = load_folder_source(kermany_root, 32, 0.25, 0)
    reasons = {Path(f.path).name: f.reason for f in data.skipped}
    assert reasons["IM-0999-0001.jpeg"] == "zero-byte file"
    assert "cannot decode" in reasons["IM-0998-0001.jpeg"]


def test_missing_root_and_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_folder_source(tmp_path / "nope", 32, 0.2, 0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        load_folder_source(tmp_path / "flat", 32, 0.2, 0)


def test_medmnist_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, **arrays)
    data = load_medmnist(path, 32, ["normal", "pneumonia"])
    assert data.train.images.shape == (20, 1, 32, 32) and data.test.labels.tolist() == [0, 1] * 4
    np.savez(tmp_path / "bad.npz", train_images=arrays["train_images"])
    with pytest.raises(DataError, match="lacks the MedMNIST keys"):
        load_medmnist(tmp_path / "bad.npz", 28)


def test_synthetic_is_seeded_and_multiclass() -> None:
    a = make_synthetic(12, 6, 6, 32, num_classes=3, seed=1)
    b = make_synthetic(12, 6, 6, 32, num_classes=3, seed=1)
    assert torch.equal(a.train.images, b.train.images)
    assert sorted(set(a.train.labels.tolist())) == [0, 1, 2] and len(a.class_names) == 3


def test_datamodule_loaders_and_balance() -> None:
    dm = XRayDataModule(
        {
            "name": "synthetic",
            "n_train": 40,
            "n_val": 10,
            "n_test": 10,
            "image_size": 32,
            "batch_size": 8,
            "balance": "weights",
        }
    )
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 32, 32) and y.dtype == torch.long
    assert dm.num_classes == 2 and torch.allclose(dm.loss_weights(), torch.ones(2))
    with pytest.raises(ConfigError, match="data.balance"):
        XRayDataModule({"name": "synthetic", "balance": "oversample"})
