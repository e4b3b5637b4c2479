"""scripts/gpu_check.sh rehearsed on the CPU (DRY=1): both device phases run their commands to the end on a tiny
Kermany layout, so the script a GPU session runs in its few minutes of device time does not rot between them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from tests.conftest import REPO


def _gpu_check(phase: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), phase],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_both_phases_run_to_the_end_on_the_cpu(kermany_root: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"  # stand-ins for the ImageNet files (random values, the real layouts)
    weights.mkdir()
    torch.manual_seed(0)
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        torch.save(timm.create_model(name).state_dict(), weights / f"{name}_imagenet.pth")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DRY": "1",
        "PY": sys.executable,
        "DATA": str(kermany_root),
        "WEIGHTS": str(weights),
        "OUT": str(out),
        "RUNS": str(tmp_path / "mlruns"),  # not the repository's own mlruns/ and .cache/
        "XRAYFUSION_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)

    speed = _gpu_check("speed", env, tmp_path)
    assert speed.returncode == 0, speed.stdout[-3000:] + speed.stderr[-3000:]
    assert "| (a) xrayfusion, K branches jointly |" in (out / "speed.txt").read_text()

    recipe = _gpu_check("recipe", env, tmp_path)
    assert recipe.returncode == 0, recipe.stdout[-3000:] + recipe.stderr[-3000:]
    train = (out / "train.txt").read_text()
    assert "ImageNet weights loaded from" in train and "efficientnet_lite2" in train
    # the out-of-fold fit kermany_gpu's fusion.cv=auto makes on Kermany's saturated validation (forced in a rehearsal)
    assert "cross-fitting average on 2 folds" in train
    agreement = (out / "agreement.txt").read_text()
    rows = [line for line in agreement.splitlines() if line.startswith(("| evaluate", "| predict", "| served"))]
    assert len(rows) == 3 and all(float(r.split("|")[2]) < 1e-5 for r in rows), agreement
    assert (out / "mlflow.db").stat().st_size > 0 and any((tmp_path / "mlruns").rglob("best.ckpt"))

    unknown = _gpu_check("tune", env, tmp_path)
    assert unknown.returncode == 2 and "unknown phase tune" in unknown.stdout
