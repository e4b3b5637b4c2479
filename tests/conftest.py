"""Shared fixtures: tiny data written to tmp dirs, the train task in-process on composed configs, the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_EMPTY_STORE: list[Path] = []  # one migrated, empty MLflow SQLite store per test process


def seed_store(folder: Path) -> None:
    """Put an empty MLflow SQLite store at folder/mlflow.db unless one is there: a copy of one made once per test
    process (a new store runs MLflow's schema migrations, about 3 s of CPU per training test otherwise). Only for
    fixtures that train: read-only commands must still find no store where none was made."""
    target = folder / "mlflow.db"
    if target.exists():
        return
    if not _EMPTY_STORE:
        import mlflow

        template = Path(tempfile.mkdtemp(prefix="xrayfusion-empty-store-")) / "mlflow.db"
        mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()
        _EMPTY_STORE.append(template)
    shutil.copyfile(_EMPTY_STORE[0], target)


def write_image(path: Path, value: int, size: int = 40, mode: str = "L", seed: int = 0) -> Path:
    """A small image with a bright square whose brightness depends on `value` (learnable)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(30, 90, size=(size, size)).astype(np.uint8)
    if value:
        arr[size // 4 : size // 2, size // 4 : size // 2] = 220
    img = Image.fromarray(arr, mode="L").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def kermany_root(tmp_path: Path) -> Path:
    """A tiny Kaggle chest_xray layout with Kaggle-style patient file names (no val/ folder)."""
    root = tmp_path / "chest_xray"
    n = 0
    for split, patients in (("train", 12), ("test", 4)):
        for p in range(patients):
            for k in range(2):  # two images per patient
                n += 1
                write_image(root / split / "NORMAL" / f"IM-{p:04d}-{k:04d}.jpeg", 0, seed=n)
                n += 1
                write_image(root / split / "PNEUMONIA" / f"person{p}_bacteria_{k}.jpeg", 1, seed=n)
    return root


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m xrayfusion.<module> ARGS` in tmp_path against a tmp SQLite MLflow store."""

    def run(args: Sequence[str], module: str = "train", timeout: int = 600, env: dict | None = None):
        full_env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        cmd = [sys.executable, "-m", f"xrayfusion.{module}", *args]
        if module in ("train", "search"):
            if "MLFLOW_TRACKING_URI" not in (env or {}):
                seed_store(tmp_path)
            cmd.append(f"hydra.run.dir={tmp_path}/outputs/run")
            cmd.append(f"paths.mlruns_dir={tmp_path}/mlruns")
        return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def cli_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture):
    """Run `python -m xrayfusion.<module> ARGS` in this process (the entry's own `run` wrapper, Hydra and all):
    returns (exit code, stdout, stderr) like a subprocess would, without its start-up cost."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    from xrayfusion.core.cli import run as run_entry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)

    def run(args: Sequence[str], module: str = "train") -> subprocess.CompletedProcess:
        entry = importlib.import_module("xrayfusion.data.__main__" if module == "data" else f"xrayfusion.{module}")
        extra = [f"hydra.run.dir={tmp_path}/outputs/run", f"paths.mlruns_dir={tmp_path}/mlruns"]
        if module in ("train", "search"):
            seed_store(tmp_path)
        monkeypatch.setattr(sys, "argv", [module, *args, *(extra if module in ("train", "search") else [])])
        GlobalHydra.instance().clear()
        capfd.readouterr()
        code = 0
        try:
            run_entry(entry.main)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        out = capfd.readouterr()
        return subprocess.CompletedProcess(sys.argv, code, out.out, out.err)

    return run


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """A config composed with Hydra's compose API from the shipped conf/ (no Hydra run, no output folder)."""
    from hydra import compose, initialize_config_dir

    from xrayfusion.core.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


@pytest.fixture
def train_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., float | None]:
    """Run the train task in this process on a composed config, into a tmp SQLite store and tmp folders."""
    from xrayfusion.training.run import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)

    def run(overrides: Sequence[str]) -> float | None:
        seed_store(tmp_path)
        paths = [f"paths.root_dir={tmp_path}"]
        if not any(o.startswith("paths.output_dir=") for o in overrides):
            paths.append(f"paths.output_dir={tmp_path}/outputs/run")
        return train(compose_config("train", [*overrides, *paths]))

    return run


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the local servers tests start)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SMALL_SYNTHETIC = [
    "data=synthetic",
    "data.n_train=64",
    "data.n_val=32",
    "data.n_test=32",
    "data.image_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    # keep training tests quick: few bootstrap resamples, no pyfunc model (tests/test_cli_evaluate.py covers it)
    "metrics.bootstrap=100",
    "tracking.log_model=false",
    "gradcam.n_images=2",
]


def assert_logged_test_metrics_recompute(tracking_uri: str, run_id: str) -> None:
    """Every logged `test/<model>/<metric>` equals what the run's own test_predictions.csv and its logged
    thresholds give (one decision rule, one set of metric functions)."""
    import mlflow
    import pandas as pd
    import torch

    from xrayfusion.evaluation.metrics import compute_metrics

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    with __import__("tempfile").TemporaryDirectory() as tmp:
        frame = pd.read_csv(client.download_artifacts(run_id, "test_predictions.csv", tmp))
    labels = torch.tensor(frame["label"].to_numpy())
    models = sorted({c.split("/")[0] for c in frame.columns if "/" in c})
    assert "fused" in models
    for name in models:
        probs = torch.tensor(frame[[c for c in frame.columns if c.startswith(f"{name}/")]].to_numpy()).float()
        threshold = float(run.data.params.get(f"threshold/{name}", 0.5))
        for metric, value in compute_metrics(labels, probs, threshold).items():
            if value == value:  # not NaN
                assert run.data.metrics[f"test/{name}/{metric}"] == pytest.approx(value, abs=1e-6), (name, metric)


def mlflow_models_predict(tracking_uri: str, run_id: str, paths: Sequence[str], cwd: Path):
    """The run's logged pyfunc model on image files through MLflow's own CLI (`mlflow models predict`), no
    xrayfusion command and no PYTHONPATH: the rows it returns, as a DataFrame."""
    import json

    import pandas as pd

    pd.DataFrame({"path": list(paths)}).to_csv(cwd / "paths.csv", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("PYTHONPATH", None)
    cli = [sys.executable, "-m", "mlflow", "models", "predict", "-m", f"runs:/{run_id}/model"]
    served = subprocess.run(
        [*cli, "-i", "paths.csv", "-t", "csv", "--env-manager", "local", "-o", "served.json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    return pd.DataFrame(json.loads((cwd / "served.json").read_text())["predictions"])
