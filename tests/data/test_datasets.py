"""Real-world datasets: Coronahack CSV, any folder layout, 16-bit PNG, DICOM, and broken files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_logged_test_metrics_recompute
from tests.training.test_cli import artifact_paths
from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.data import XRayDataModule, build_source
from xrayfusion.data.coronahack import CSV_NAME, IMAGE_DIR, load_coronahack
from xrayfusion.data.decode import load_grey, read_dicom
from xrayfusion.data.sources import load_folder_source

CORONAHACK_HEADER = ",X_ray_image_name,Label,Dataset_type,Label_2_Virus_category,Label_1_Virus_category".split(",")
TRAIN_FAST = ["model.branches=[small_cnn,darknet]", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def class_pixels(k: int, size: int = 40, seed: int = 0, high: int = 255) -> np.ndarray:
    """Noise with k bright squares (learnable for any number of classes), scaled to 0..high."""
    rng = np.random.default_rng(seed)
    arr = rng.uniform(0.1, 0.35, size=(size, size))
    for j in range(k):
        y = 4 + 12 * j
        arr[y : y + 9, 8:30] = 0.95
    return (arr * high).round()


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    bits: int = 12,
) -> Path:
    """A minimal CR DICOM written with pydicom (uint16 pixels, optional rescale and window)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", path.stem
    ds.set_pixel_data(pixels.astype(np.uint16), photometric, bits)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png16(path: Path, k: int, seed: int) -> Path:
    pixels = (class_pixels(k, seed=seed, high=60000) + 1000).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_rgb_jpeg(path: Path, k: int, seed: int) -> Path:
    grey = class_pixels(k, seed=seed).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([grey] * 3, -1), mode="RGB").save(path)
    return path


# ---------------------------------------------------------------- Coronahack


def make_coronahack(root: Path, nested: bool = True) -> dict[str, list[str]]:
    """A tiny Coronahack download: CSV (with 'Pnemonia', 'Pneumonia', absent files, Stress-Smoking) + images."""
    image_root = root / IMAGE_DIR / IMAGE_DIR if nested else root / IMAGE_DIR
    rows, absent = [], []
    n = 0
    for split, patients in (("TRAIN", 10), ("TEST", 3)):
        for p in range(patients):
            for k in range(2):
                n += 1
                for label, cat, name, cls in (
                    ("Normal", "", f"IM-{split}{p:03d}-{k:04d}.jpeg", 0),
                    ("Pnemonia", "bacteria", f"person{split}{p}_bacteria_{k}.jpeg", 1),
                    ("Pneumonia" if p % 2 else "Pnemonia", "Virus", f"person{split}{p}_virus_{k}.jpeg", 2),
                ):
                    rows.append([len(rows), name, label, split, "", cat])
                    write_rgb_jpeg(image_root / split.lower() / name, cls, seed=n * 3 + cls)
    for name, label, cat in (
        ("person999_bacteria_1.jpeg", "Pnemonia", "bacteria"),
        ("IM-9999-0001.jpeg", "Normal", ""),
    ):
        rows.append([len(rows), name, label, "TRAIN", "", cat])
        absent.append(name)
    write_rgb_jpeg(image_root / "train" / "person500_stress.jpeg", 1, seed=7)
    rows.append([len(rows), "person500_stress.jpeg", "Pnemonia", "TRAIN", "ARDS", "Stress-Smoking"])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / CSV_NAME, "w", newline="") as fh:
        csv.writer(fh).writerows([CORONAHACK_HEADER, *rows])
    return {"absent": absent, "stress": ["person500_stress.jpeg"]}


@pytest.mark.parametrize("nested", [True, False])
def test_coronahack_binary_reads_both_depths_and_reports_absent_rows(tmp_path: Path, nested: bool) -> None:
    info = make_coronahack(tmp_path / "ch", nested=nested)
    data = load_coronahack(tmp_path / "ch", 32, "binary", 0.25, 0)
    assert data.class_names == ["normal", "pneumonia"]
    assert len(data.train) + len(data.val) == 10 * 2 * 3 + 1  # Stress-Smoking is pneumonia in the binary task
    assert len(data.test) == 3 * 2 * 3
    assert data.test.class_counts(2) == [6, 12]
    assert set(data.train.groups).isdisjoint(data.val.groups)
    skipped = {Path(f.path).name: f.reason for f in data.skipped}
    assert set(skipped) == set(info["absent"]) and all("absent" in r for r in skipped.values())


def test_coronahack_three_class_from_virus_category(tmp_path: Path) -> None:
    info = make_coronahack(tmp_path / "ch")
    data = build_source({"name": "coronahack", "root": str(tmp_path / "ch"), "task": "three_class", "image_size": 32})
    assert data.class_names == ["normal", "bacterial", "viral"]
    assert data.test.class_counts(3) == [6, 6, 6]
    train_val = [a + b for a, b in zip(data.train.class_counts(3), data.val.class_counts(3), strict=True)]
    assert train_val == [20, 20, 20]
    skipped = {Path(f.path).name: f.reason for f in data.skipped}
    assert set(skipped) == {*info["absent"], *info["stress"]}
    assert "Stress-Smoking" in skipped["person500_stress.jpeg"]


def test_coronahack_wrong_csv_or_layout_fails_naming_expected_and_found(tmp_path: Path) -> None:
    root = tmp_path / "ch"
    make_coronahack(root)
    text = (root / CSV_NAME).read_text().replace("Dataset_type", "Split")
    (root / CSV_NAME).write_text(text)
    expected = r"lacks the column\(s\) \['Dataset_type'\].*found ,X_ray_image_name,Label,Split"
    with pytest.raises(DataError, match=expected):
        load_coronahack(root, 32)
    (root / CSV_NAME).unlink()
    with pytest.raises(DataError, match=f"has no {CSV_NAME}.*found \\['{IMAGE_DIR}'\\]"):
        load_coronahack(root, 32)
    make_coronahack(tmp_path / "other")
    (tmp_path / "other" / IMAGE_DIR).rename(tmp_path / "other" / "images")
    with pytest.raises(DataError, match="expected Coronahack-Chest-XRay-Dataset/.*found"):
        load_coronahack(tmp_path / "other", 32)
    with pytest.raises(ConfigError, match="data.task='four'"):
        load_coronahack(tmp_path / "other", 32, task="four")


# ---------------------------------------------------------------- decoding


def test_dicom_rescale_window_and_monochrome1(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 4000, 16), (16, 1)).round()
    plain = read_dicom(write_dicom(tmp_path / "plain.dcm", ramp))
    assert plain.dtype == np.uint8 and plain.min() == 0 and plain.max() == 255  # 12-bit normalised
    assert np.all(np.diff(plain[0].astype(int)) > 0)
    inverted = read_dicom(write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - plain)
    # rescaled value = 2 * stored - 1000; a narrow window around 1000 saturates both ends
    windowed = read_dicom(write_dicom(tmp_path / "w.dcm", ramp, rescale=(2.0, -1000.0), window=(1000.0, 400.0)))
    stored = ramp[0]
    rescaled = 2 * stored - 1000
    assert np.all(windowed[0][rescaled < 800] == 0) and np.all(windowed[0][rescaled > 1200] == 255)
    assert 0 < windowed[0][np.argmin(np.abs(rescaled - 1000))] < 255
    # without the rescale the same window would put every pixel of the ramp elsewhere
    unscaled = read_dicom(write_dicom(tmp_path / "w0.dcm", ramp, window=(1000.0, 400.0)))
    assert not np.array_equal(unscaled, windowed)
    assert load_grey(tmp_path / "plain.dcm", 8).shape == (8, 8)


def test_png16_and_rgb_are_grey_uint8(tmp_path: Path) -> None:
    png16 = write_png16(tmp_path / "a.png", 2, seed=1)
    assert Image.open(png16).mode.startswith("I")
    grey = load_grey(png16, 40)
    assert grey.dtype == np.uint8 and grey.min() == 0 and grey.max() == 255
    rgb = load_grey(write_rgb_jpeg(tmp_path / "b.jpeg", 1, seed=1), 40)
    assert rgb.shape == (40, 40) and rgb.max() > 200


def test_broken_files_raise_reasons(tmp_path: Path) -> None:
    good = write_rgb_jpeg(tmp_path / "good.jpeg", 1, seed=0).read_bytes()
    (tmp_path / "trunc.jpeg").write_bytes(good[: len(good) // 2])
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    (tmp_path / "zero.png").write_bytes(b"")
    for name, reason in (
        ("trunc.jpeg", "cannot decode image"),
        ("bad.dcm", "cannot decode DICOM"),
        ("zero.png", "zero-byte"),
        ("missing.png", "not found"),
    ):
        with pytest.raises(ValueError, match=reason):
            load_grey(tmp_path / name, 32)


# ---------------------------------------------------------------- any folder layout


def make_folder(root: Path, broken: bool = True) -> None:
    """ROOT/{train,test}/{Healthy,bacterial_pneu,viral}/ with 16-bit PNGs, RGB JPEGs and DICOMs (some MONOCHROME1)."""
    n = 0
    for split, patients in (("train", 8), ("test", 3)):
        for cls in ["viral", "Healthy", "bacterial_pneu"]:
            label_k = {"Healthy": 0, "bacterial_pneu": 1, "viral": 2}[cls]
            for p in range(patients):
                n += 1
                base = root / split / cls
                write_png16(base / f"p{split}{cls}{p}_a.png", label_k, seed=n)
                write_rgb_jpeg(base / f"p{split}{cls}{p}_b.jpg", label_k, seed=n + 1000)
                pixels = class_pixels(label_k, seed=n + 2000, high=4000)
                if p % 2:
                    write_dicom(base / f"patient{p}" / "img1.dcm", 4000 - pixels, photometric="MONOCHROME1")
                else:
                    write_dicom(base / f"patient{p}" / "img1.dcm", pixels, rescale=(1.0, -1024.0))
    if broken:
        (root / "train" / "Healthy" / "zero.png").write_bytes(b"")
        jpeg = (root / "train" / "viral" / "ptrainviral0_b.jpg").read_bytes()
        (root / "train" / "viral" / "trunc.jpg").write_bytes(jpeg[:200])
        (root / "train" / "viral" / "notes.txt").write_text("not an image")
        (root / "train" / "viral" / ".DS_Store").write_bytes(b"junk")
        (root / "train" / "empty_class").mkdir()
        write_rgb_jpeg(root / "test" / "unknown_class" / "x.jpg", 1, seed=1)


def test_folder_any_classes_mixed_formats_and_broken_files(tmp_path: Path) -> None:
    make_folder(tmp_path / "f")
    data = build_source({"name": "folder", "root": str(tmp_path / "f"), "image_size": 32, "val_fraction": 0.25})
    assert data.class_names == ["Healthy", "bacterial_pneu", "viral"]  # sorted, stable
    assert len(data.train) + len(data.val) == 8 * 3 * 3 and len(data.test) == 3 * 3 * 3
    assert set(data.train.groups).isdisjoint(data.val.groups)
    assert "patient1" in data.train.groups + data.val.groups  # nested DICOM folders group by patient
    skipped = {Path(f.path).name: f.reason for f in data.skipped}
    assert set(skipped) == {"zero.png", "trunc.jpg", "notes.txt", "empty_class", "x.jpg"}
    assert "empty class folder" in skipped["empty_class"] and "unknown_class" in skipped["x.jpg"]
    # a MONOCHROME1 DICOM (stored inverted) comes out the same way up: its bright squares stay bright
    mono1 = load_grey(tmp_path / "f" / "test" / "viral" / "patient1" / "img1.dcm", 40).astype(float)
    squares = np.zeros((40, 40), dtype=bool)
    squares[4:13, 8:30] = squares[16:25, 8:30] = True
    assert mono1[squares].mean() > 150 and mono1[~squares].mean() < 80


def test_folder_explicit_class_order_and_layout_errors(tmp_path: Path) -> None:
    make_folder(tmp_path / "f", broken=False)
    order = ["viral", "Healthy", "bacterial_pneu"]
    data = load_folder_source(tmp_path / "f", 32, 0.25, 0, class_names=order)
    assert data.class_names == order and data.skipped == []
    with pytest.raises(DataError, match=r"no class folder\(s\) \['covid'\].*found folders"):
        load_folder_source(tmp_path / "f", 32, 0.25, 0, class_names=["covid", "viral"])
    lonely = tmp_path / "lonely" / "train"
    write_rgb_jpeg(lonely / "only" / "a.jpg", 0, seed=0)
    (lonely / "empty").mkdir()
    with pytest.raises(DataError, match=r"1 non-empty class folder\(s\) \['only'\]"):
        load_folder_source(tmp_path / "lonely", 32, 0.25, 0)
    unreadable = tmp_path / "unreadable" / "train"
    for i in range(4):
        write_rgb_jpeg(unreadable / "a" / f"{i}.jpg", 0, seed=i)
        (unreadable / "b" / f"{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (unreadable / "b" / f"{i}.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"no readable images of class\(es\) \['b'\]"):
        load_folder_source(tmp_path / "unreadable", 32, 0.25, 0)


def test_strict_fails_before_training_with_the_list(tmp_path: Path) -> None:
    make_folder(tmp_path / "f")
    cfg = {"name": "folder", "root": str(tmp_path / "f"), "image_size": 32, "val_fraction": 0.25}
    assert len(XRayDataModule(cfg).prepare().skipped) == 5
    with pytest.raises(DataError, match=r"data.strict=true and 5 file\(s\) skipped:.*zero.png \(zero-byte file\)"):
        XRayDataModule({**cfg, "strict": True}).prepare()


# ---------------------------------------------------------------- end to end through the CLI


def _only_run(tracking_uri: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_cli_coronahack_three_class_stacking_logs_skipped(cli_in_process, tracking_uri: str, tmp_path: Path) -> None:
    info = make_coronahack(tmp_path / "ch")
    args = ["data=coronahack", f"data.root={tmp_path / 'ch'}", "data.task=three_class", "data.image_size=32"]
    result = cli_in_process([*args, "data.val_fraction=0.3", "fusion=stacking", *TRAIN_FAST])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 file(s) skipped" in result.stdout + result.stderr
    run = _only_run(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.params["data/class_names"] == "normal,bacterial,viral"
    assert run.data.metrics["data/skipped"] == 3
    assert_logged_test_metrics_recompute(tracking_uri, run.info.run_id)  # macro-averaged over three classes
    assert any(k.startswith("stacking/") for k in run.data.params)
    client = mlflow.MlflowClient(tracking_uri)
    artifacts = artifact_paths(client, run.info.run_id)
    assert "skipped_files.csv" in artifacts and "plots/confusion_matrix_test.png" in artifacts
    local = client.download_artifacts(run.info.run_id, "skipped_files.csv", str(tmp_path / "dl"))
    with open(local) as fh:
        listed = {Path(r["path"]).name for r in csv.DictReader(fh)}
    assert listed == {*info["absent"], *info["stress"]}


@pytest.mark.slow
def test_cli_folder_png16_dicom_broken_then_strict(cli_in_process, tracking_uri: str, tmp_path: Path) -> None:
    make_folder(tmp_path / "f")
    args = ["data=folder", f"data.root={tmp_path / 'f'}", "data.image_size=32", "data.val_fraction=0.25"]
    strict = cli_in_process([*args, "data.strict=true", *TRAIN_FAST])
    assert strict.returncode == 2 and "data.strict=true and 5 file(s) skipped" in strict.stderr
    assert "zero.png" in strict.stderr and "Traceback" not in strict.stderr
    assert mlflow.MlflowClient(tracking_uri).get_experiment_by_name("xrayfusion") is None  # failed before any run
    result = cli_in_process([*args, "fusion=average", *TRAIN_FAST])
    assert result.returncode == 0, result.stderr[-3000:]
    run = _only_run(tracking_uri)
    assert run.data.params["data/class_names"] == "Healthy,bacterial_pneu,viral"
    assert run.data.metrics["data/skipped"] == 5 and "test/fused/f1" in run.data.metrics


@pytest.mark.slow
def test_cli_wrong_csv_fails_at_once(cli_in_process, tmp_path: Path) -> None:
    root = tmp_path / "ch"
    make_coronahack(root)
    (root / CSV_NAME).write_text("name,label\na.jpeg,Normal\n")
    result = cli_in_process(["data=coronahack", f"data.root={root}", "data.image_size=32", *TRAIN_FAST])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "X_ray_image_name" in result.stderr and "found name,label" in result.stderr


# ---------------------------------------------------------------- decode cache and dataset report


def test_decode_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path: Path, monkeypatch) -> None:
    from xrayfusion.data import decode

    paths = [write_rgb_jpeg(tmp_path / f"{i}.jpeg", i % 3, seed=i) for i in range(4)]
    cache = tmp_path / "cache"
    first = decode.decode_files(paths, 32, cache_dir=cache)
    assert len(list(cache.glob("decoded-*.pt"))) == 1 and first.sizes == [(40, 40)] * 4

    def no_reading(path, size):
        raise AssertionError(f"{path} was decoded again")

    with monkeypatch.context() as m:  # same files, sizes and mtimes: served from the cache, nothing is read
        m.setattr(decode, "_load", no_reading)
        cached = decode.decode_files(paths, 32, cache_dir=cache)
    assert cached.images.equal(first.images) and cached.ok == first.ok and cached.sizes == first.sizes
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(paths[0])  # a changed file: a new key
    os.utime(paths[0], ns=(paths[0].stat().st_atime_ns, paths[0].stat().st_mtime_ns + 10**9))
    again = decode.decode_files(paths, 32, cache_dir=cache)
    assert int(again.images[0].max()) == 0 and again.images[1:].equal(first.images[1:])
    assert len(list(cache.glob("decoded-*.pt"))) == 2
    for f in cache.glob("decoded-*.pt"):  # a damaged cache file is a miss, never an error
        f.write_bytes(b"cut short")
    assert decode.decode_files(paths, 32, cache_dir=cache).images.equal(again.images)


def test_dataset_report_counts_patients_sizes_and_leaks(kermany_root: Path) -> None:
    from xrayfusion.data.report import dataset_report

    (kermany_root / "test" / "NORMAL" / "IM-0999-0001.jpeg").write_bytes(b"")
    data = build_source({"name": "kermany", "root": str(kermany_root), "image_size": 32, "val_fraction": 0.25})
    report = dataset_report(data)
    lines = report.splitlines()
    assert lines[0] == "classes (label order): 0=NORMAL, 1=PNEUMONIA"
    test_row = next(line.split() for line in lines if line.startswith("test"))
    assert test_row == ["test", "16", "8", "8", "8", "40x40"]  # 4 normal + 4 pneumonia patients
    assert "skipped: 1 file(s) skipped: IM-0999-0001.jpeg (zero-byte file)" in report
    assert "patients in two splits: train+test: " in report  # the fixture reuses patient ids across splits


@pytest.mark.slow
def test_cli_data_report_and_warm_cache(run_cli, tmp_path: Path) -> None:
    make_coronahack(tmp_path / "ch")
    args = ["data=coronahack", f"data.root={tmp_path / 'ch'}", "data.task=three_class", "data.image_size=32"]
    cold = run_cli(args, module="data")
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "classes (label order): 0=normal, 1=bacterial, 2=viral" in cold.stdout
    test_row = next(line.split() for line in cold.stdout.splitlines() if line.startswith("test"))
    assert test_row[:5] == ["test", "18", "6", "6", "6"] and test_row[-1] == "40x40"
    assert "skipped: 3 file(s) skipped" in cold.stdout and "patients in two splits: none" in cold.stdout
    assert len(list((tmp_path / ".cache" / "xrayfusion").glob("decoded-*.pt"))) == 2  # train and test
    warm = run_cli(args, module="data")
    assert warm.returncode == 0 and warm.stdout.splitlines()[1:] == cold.stdout.splitlines()[1:]


def test_build_augment_brightness_and_contrast() -> None:
    import torch
    from torchvision.transforms import v2

    from xrayfusion.data.transforms import build_augment

    assert build_augment({"enabled": False, "brightness": 0.3}) is None
    aug = build_augment({"hflip": 0.0, "brightness": 0.3, "contrast": 0.0})
    (jitter,) = aug.transforms
    assert isinstance(jitter, v2.ColorJitter) and jitter.brightness == (0.7, 1.3) and jitter.contrast is None
    image = torch.full((1, 16, 16), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    outs = {int(aug(image)[0, 0, 0]) for _ in range(20)}
    assert len(outs) > 5 and min(outs) >= 70 and max(outs) <= 130  # brightness factor within [0.7, 1.3]


def test_random_erasing_zeroes_a_rectangle() -> None:
    import torch

    from xrayfusion.data.transforms import build_augment

    assert build_augment({"enabled": True, "erasing": 0.0}) is None
    erase = build_augment({"enabled": True, "erasing": 1.0})
    image = torch.full((1, 64, 64), 200, dtype=torch.uint8)
    out = erase(image)
    zeros = out == 0
    assert 0.02 * 64 * 64 <= int(zeros.sum()) <= 0.2 * 64 * 64 + 64  # one rectangle of 2-20% of the image
    rows, cols = zeros[0].any(dim=1).nonzero(), zeros[0].any(dim=0).nonzero()
    assert int(zeros.sum()) == len(rows) * len(cols)  # a filled rectangle, not scattered pixels
