"""scripts/benchmark.py speed on a tiny Kermany layout: every contender runs and the tables print."""

from __future__ import annotations

import os
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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
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
