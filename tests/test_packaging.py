"""`pip install .` ships the configs: the wheel alone trains from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL_SYNTHETIC


@pytest.mark.slow
def test_the_wheel_ships_conf_and_trains_from_another_folder(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("xrayfusion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in (
        "xrayfusion/conf/train.yaml",
        "xrayfusion/conf/data/kermany.yaml",
        "xrayfusion/conf/fusion/stacking.yaml",
    ):
        assert shipped in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere}/mlflow.db"}
    probe = "import xrayfusion, xrayfusion.core.cli as c; print(xrayfusion.__file__); print(c.CONFIG_DIR)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.splitlines() == [str(site / "xrayfusion" / "__init__.py"), str(site / "xrayfusion" / "conf")]
    train = subprocess.run(
        [sys.executable, "-m", "xrayfusion.train", *SMALL_SYNTHETIC, "model.branches=[small_cnn]", "fusion=average"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert (elsewhere / "mlflow.db").is_file() and list(elsewhere.glob("outputs/*/*/checkpoints/best.ckpt"))
