"""scripts/benchmark.py on a tiny Kermany layout: every contender runs and the tables print.

The script runs as users run it (no PYTHONPATH of its own): it imports the installed xrayfusion, and its
subcommand modules (scripts/bench/) from the script's own folder."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_speed_prints_contender_and_ratio_tables(kermany_root: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "benchmark.py"),
        "speed",
        f"--data-root={kermany_root}",
        "--branches",
        "small_cnn",
        "darknet",
        "--image-size=32",
        "--batch-size=8",
        "--epochs=1",
        "--rounds=1",
        "--seed-workers=0",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| (")]
    assert [r.split("|")[1].strip()[:3] for r in rows[:4]] == ["(a)", "(b)", "(c)", "(d)"]
    for row in rows[:4]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6
        float(cells[1]), float(cells[2]), float(cells[4])  # wall, decode, images/s are numbers
        assert "small_cnn" in cells[5]
    assert "fused (average)" in rows[0] and "darknet" in rows[2]
    ratios = [line for line in lines if line.startswith("| (") and line.rstrip().endswith("x |")]
    assert len(ratios) == 4
    assert any("framework overhead, small_cnn" in r for r in ratios)
    guard = [line for line in lines if line.startswith("| every ")]
    assert [row.split(":")[0] for row in guard] == ["| every 1 step(s)", "| every 50 step(s)"]
    for row in guard:
        float(row.strip("| ").rsplit("|", 1)[1])  # microseconds per step, a number


def _benchmark(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_precision_prints_per_branch_speedups(tmp_path: Path) -> None:
    args = ["precision", "--branches", "small_cnn", "resnet18", "--image-size=32", "--batch-size=4", "--steps=1"]
    result = _benchmark(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| small_cnn") or line.startswith("| res")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x")
    assert "model.bf16_branches=[" in result.stdout


@pytest.mark.slow
def test_profile_prints_phase_shares_and_operator_table(kermany_root: Path, tmp_path: Path) -> None:
    args = ["profile", f"--data-root={kermany_root}", "--branches", "small_cnn", "--image-size=32", "--batch-size=8"]
    result = _benchmark([*args, "--steps=2", "--top=5"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "2 training steps" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.rstrip().endswith("% |")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "data (augment + collate)",
        "forward + loss",
        "backward",
        "optimizer",
    ]
    assert sum(float(r.split("|")[3].strip().rstrip("%")) for r in rows) == pytest.approx(100, abs=3)
    assert "Self CPU" in out


def test_print_quality_shows_branches_fused_anchors_and_learned_weights(capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # the script's own folder, as `python scripts/...` has it
    quality = importlib.import_module("bench.quality")

    metrics = {f"test/{m}/{k}": 0.9 for m in ("a", "fused") for k in ("acc", "recall", "specificity", "f1", "auroc")}
    metrics["time/fit_seconds"] = 12.0
    params = {"fusion/name": "average", "data/n_test": "624", "average/weight_a": "1.0"}
    quality.print_quality(metrics, params, wall=15.0)
    out = capsys.readouterr().out
    assert "| a | 0.900 |" in out and "| fused (average) | 0.900 |" in out
    assert "Kermany et al. 2018" in out and "learned average weights: a 1.000" in out
    assert "fit 12 s, end to end 15 s" in out


def test_switches_setting_may_carry_its_own_image_size(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    benchmark = importlib.import_module("benchmark")
    switches = importlib.import_module("bench.switches")

    args = benchmark.build_parser().parse_args(["switches", "--settings", "fp32+cl", "cl+trainable4@160"])
    assert args.settings == ["fp32+cl", "cl+trainable4@160"]
    assert switches.setting_overrides("fp32+cl") == ["model.channels_last=true"]
    assert switches.setting_overrides("cl+trainable4@160") == [
        "model.channels_last=true",
        "model.trainable_layers=4",
        "data.image_size=160",
    ]
    for bad in ("cl+trainable9", "fp32+cl@", "fp32+cl@big", "fp32+cl@0"):
        with pytest.raises(SystemExit):
            benchmark.build_parser().parse_args(["switches", "--settings", bad])


def test_scripts_leave_sys_path_and_pythonpath_alone() -> None:
    sources = [*(REPO / "scripts").glob("*.py"), *(REPO / "scripts" / "bench").glob("*.py")]
    assert len(sources) >= 8
    for source in sources:
        text = source.read_text()
        assert "sys.path" not in text and "PYTHONPATH" not in text, source.name


def test_bootstrap_prints_both_methods_and_that_they_agree(tmp_path: Path) -> None:
    args = ["bootstrap", "--images=100", "--resamples=50", "--loop-resamples=10", "--models=1"]
    result = _benchmark(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| all ") or line.startswith("| one ")]
    assert len(rows) == 2
    [float(r.strip("| ").rsplit("|", 1)[1]) for r in rows]  # seconds, numbers (no timing is asserted)
    gap = float(result.stdout.rsplit("same resamples: ", 1)[1].split()[0])
    assert gap < 1e-6


@pytest.mark.slow
def test_feature_cache_prints_live_and_cached_runs_side_by_side(kermany_root: Path, tmp_path: Path) -> None:
    import timm
    import torch

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), weights / "efficientnet_lite0_test.pth")
    args = ["feature-cache", f"--data-root={kermany_root}", f"--weights-dir={weights}", "--epochs=2", "--fusion-cv=2"]
    overrides = [
        "data.augment.enabled=false",  # then the live and the cached run train alike
        "model.branches=[efficientnet_lite0,small_cnn]",
        "model.branch_sizes=null",
        "data.image_size=32",
        "data.batch_size=8",
        "metrics.bootstrap=0",
        "data.val_fraction=0.25",
    ]
    result = _benchmark([*args, *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
        for r in result.stdout.splitlines()
        if r.startswith("| live") or r.startswith("| cached")
    }
    assert list(rows) == ["live", "cached", "cached-1-epoch"]
    assert rows["live"][2] == "-" and float(rows["cached"][2]) >= 0  # only cached runs have a feature pass
    assert rows["cached"][1] == "2" and rows["cached-1-epoch"][1] == "1"
    for cells in rows.values():
        float(cells[3]), float(cells[6]), float(cells[7]), float(cells[8])  # epoch 1, cross-fit, end to end, auroc
    # the folds read the cache too, and give the live run's out-of-fold predictions
    [line] = [r for r in result.stdout.splitlines() if r.startswith("out-of-fold predictions, live vs cached")]
    assert float(line.split("largest difference ")[1].split()[0]) < 1e-4
    assert "cached branches: efficientnet_lite0" in result.stdout
    assert "2 epochs end to end / 1 epoch end to end = " in result.stdout
