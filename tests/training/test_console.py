"""What a run prints: no library noise, and a summary a user can act on at the end."""

from __future__ import annotations

import re

import pytest

from tests.conftest import SMALL_SYNTHETIC

NOISE = re.compile(r"warn|tip:|flops|tensor\(|downloading artifacts|cloudpickle|input_example|leafspec", re.I)


@pytest.mark.slow
def test_a_tiny_run_prints_no_noise_and_ends_with_its_summary(run_cli) -> None:
    args = [a for a in SMALL_SYNTHETIC if not a.startswith("tracking.")]  # the pyfunc model too
    result = run_cli(["model.branches=[small_cnn,darknet]", "fusion=stacking", "metrics.threshold=youden", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert [line for line in lines if NOISE.search(line)] == []
    summary = result.stdout.strip().splitlines()[-11:]
    # what runs are ranked on, with the 95% interval that says how finely validation can rank them
    score = r"\d\.\d{4}"
    assert re.fullmatch(
        rf"validation score \(what sweeps, searches and compare rank runs on\): {score} \[{score}, {score}\] "
        r"\(fusion/val_auroc, on val_crossfit5\)",
        summary.pop(0),
    )
    assert summary[0].startswith("test split, 32 images; thresholds: metrics.threshold=youden, chosen on validation")
    assert "fused on val_crossfit5" in summary[0]
    assert summary[1] == "| model | threshold | acc | sensitivity | specificity | auroc |"
    assert [row.split(" | ")[0] for row in summary[3:6]] == ["| small_cnn", "| darknet", "| fused"]
    assert re.fullmatch(r"MLflow run [0-9a-f]{32} \(experiment xrayfusion\)", summary[6])
    assert summary[7].startswith("artifacts: ") and summary[8].startswith("outputs: ")
    assert summary[9].startswith("look at it: mlflow ui --backend-store-uri sqlite:///")
