"""quality: the real training command (experiment=kermany_cpu by default) in a subprocess, timed end to end,
then the Kermany test table read back from its MLflow run, next to published anchors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from bench.common import DEFAULT_ROOT, REPO

ANCHORS = [
    ("Kermany et al. 2018 (Cell), transfer learning", 0.928, 0.968),
    ("MedMNIST+ ResNet-18, 224 px", 0.911, 0.980),
    ("Google AutoML Vision on PneumoniaMNIST", 0.946, 0.991),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="kermany_cpu")
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument("--tracking-uri", default=None, help="default: a throw-away SQLite store")
    p.add_argument("overrides", nargs="*", help="extra config overrides")


def run(args: argparse.Namespace) -> None:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="xrayfusion-quality-") as tmp:
        uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        cmd = [
            sys.executable,
            "-m",
            "xrayfusion.train",
            f"experiment={args.experiment}",
            f"data.root={args.data_root}",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={tmp}/run",
            f"paths.mlruns_dir={tmp}/mlruns",
            *args.overrides,
        ]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        print("$", " ".join(cmd[1:]), flush=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=REPO)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"training failed (exit {done.returncode})")
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("xrayfusion")
        run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
        print_quality(run.data.metrics, run.data.params, wall)


def print_quality(metrics: dict[str, float], params: dict[str, str], wall: float) -> None:
    names = sorted(
        {k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2},
        key=lambda n: (n == "fused", n),
    )
    fusion = params.get("fusion/name", "?")
    n_test = params.get("data/n_test", "?")
    rule, chosen = params.get("metrics/threshold", "?"), params.get("threshold/fused")
    threshold = f"{rule} (fused: {float(chosen):.3f}, chosen on validation)" if chosen else rule
    print(f"\nKermany test set ({n_test} images); fusion {fusion}; threshold {threshold}")
    print("\n| model | acc | sensitivity | specificity | f1 | auroc |")
    print("|---|---|---|---|---|---|")
    for n in names:
        row = [metrics.get(f"test/{n}/{m}", float("nan")) for m in ("acc", "recall", "specificity", "f1", "auroc")]
        label = f"fused ({fusion})" if n == "fused" else n
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    for title, acc, auroc in ANCHORS:
        print(f"| {title} | {acc:.3f} | | | | {auroc:.3f} |")
    weights = {k.split("weight_", 1)[1]: v for k, v in params.items() if k.startswith("average/weight_")}
    if weights:
        print("\nlearned average weights: " + ", ".join(f"{k} {float(v):.3f}" for k, v in weights.items()))
    fit = metrics.get("time/fit_seconds", float("nan"))
    print(f"\nfit {fit:.0f} s, end to end {wall:.0f} s (decode, fit, fusion, test, MLflow logging)")
