"""The logged model served over REST (`mlflow models serve` on 127.0.0.1): images as base64, strict JSON out."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import SMALL_SYNTHETIC, free_port, write_image
from tests.evaluation.test_mlflow_ui import wait_for
from xrayfusion.evaluation.loading import load_classifier
from xrayfusion.evaluation.predict import predict_files


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_served_model_takes_base64_images_and_answers_valid_json(train_task, tmp_path: Path) -> None:
    args = [a for a in SMALL_SYNTHETIC if not a.startswith("tracking.")]
    train_task(["model.branches=[small_cnn,darknet]", "fusion=stacking", *args])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", tracking_uri=uri))
    files = {p.name for p in local.iterdir()}
    assert {"served_model.py", "input_example.json", "MLmodel"} <= files  # models-from-code with an example
    assert "python_model.pkl" not in files  # nothing pickled
    good = [write_image(tmp_path / "scans" / f"img{i}.png", i % 2, size=48, seed=i) for i in range(2)]
    rows = [[base64.b64encode(p.read_bytes()).decode(), None] for p in good]
    rows += [[base64.b64encode(b"not an image").decode(), None], ["%%% not base64", None], [None, str(good[0])]]

    port = free_port()
    # the server runs `uvicorn` from PATH: the one beside this interpreter, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run.info.run_id}/model"]
    server = subprocess.Popen(
        [*cmd, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", seconds=180)
        body = json.dumps({"dataframe_split": {"columns": ["image", "path"], "data": rows}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as resp:
            answer = _strict(resp.read().decode())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    assert len(answer) == 5
    direct = predict_files(load_classifier(tmp_path / "outputs/run/checkpoints/best.ckpt"), [str(p) for p in good])
    for served, (_, expected) in zip(answer[:2], direct.iterrows(), strict=True):
        assert served["error"] is None and served["predicted_class"] == expected["predicted_class"]
        np.testing.assert_allclose(served["fused_prob_pneumonia"], expected["fused_prob_pneumonia"], atol=1e-6)
    for bad in answer[2:4]:  # undecodable bytes, invalid base64: a string reason, nulls, no NaN
        assert isinstance(bad["error"], str) and bad["predicted_class"] is None and bad["fused_prob_pneumonia"] is None
    assert answer[4]["path"] == str(good[0]) and answer[4]["error"] is None  # a path on the server's disk still works
