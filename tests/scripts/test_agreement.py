"""scripts/agreement.py on a tiny trained run: the logged test pass against evaluate, predict and the served
model, and a logged probability changed by hand shows up in every row."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO


def _table(out: str) -> dict[str, float]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "against" not in line]
    return {cells[0].strip(): float(cells[1]) for cells in rows}


@pytest.mark.slow
def test_agreement_prints_the_largest_difference_of_each_path(
    train_task,
    kermany_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train_task(
        [
            "data=kermany",
            f"data.root={kermany_root}",
            "data.image_size=32",
            "data.batch_size=8",
            "data.val_fraction=0.25",
            "data.cache_dir=null",
            "model=ensemble",
            "model.branches=[small_cnn,darknet]",
            "model.tta=flips",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "metrics.bootstrap=0",
            "gradcam.n_images=0",
        ]
    )
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    agreement = importlib.import_module("agreement")
    logged_csv = next((tmp_path / "mlruns").rglob("test_predictions.csv"))  # the run's artifact in the local store
    run_id = logged_csv.parts[-3]
    capsys.readouterr()

    agreement.main([run_id[:8], "--data-root", str(kermany_root), "--max-diff", "1e-5"])
    out = capsys.readouterr().out
    assert "agreement: every difference within --max-diff 1e-05" in out
    diffs = _table(out)
    assert set(diffs) == {"evaluate", "predict", "served pyfunc model"}
    assert all(d < 1e-5 for d in diffs.values()), out
    assert "metrics vs evaluate's recomputation: max abs difference 0\n" in out
    assert "branch diversity vs evaluate's: max abs difference 0\n" in out

    # a logged probability that is not what the model gives: every path reports it
    frame = pd.read_csv(logged_csv)
    frame.loc[0, "fused/PNEUMONIA"] = frame.loc[0, "fused/PNEUMONIA"] + 0.25
    frame.to_csv(logged_csv, index=False)
    with pytest.raises(SystemExit) as failed:
        agreement.main([run_id, "--data-root", str(kermany_root), "--max-diff", "1e-5"])
    out = capsys.readouterr().out
    assert failed.value.code == 1 and "agreement: FAILED, a difference of 0.25" in out
    assert all(d == pytest.approx(0.25, abs=1e-5) for d in _table(out).values())
    sys.modules.pop("agreement", None)

    # as a command: an unknown run is one line and exit 2; without MLFLOW_TRACKING_URI it reads ./mlruns/mlflow.db
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, str(REPO / "scripts" / "agreement.py"), "ffffffff", "--data-root", str(kermany_root)]
    result = subprocess.run(cmd, cwd=tmp_path / "outputs", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"no MLflow store at {tmp_path / 'outputs' / 'mlruns' / 'mlflow.db'}" in result.stderr
