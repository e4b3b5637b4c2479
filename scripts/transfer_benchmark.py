"""Transfer-learning benchmark: efficientnet_lite0 from scratch vs ImageNet weights vs ImageNet + freeze.

Runs the real training command once per variant (same data, epochs, size, seed) into its own MLflow store
and prints a Markdown table of test accuracy / AUROC and fit wall time:

    python scripts/transfer_benchmark.py --epochs 3 --size 96 --out /tmp/transfer_bench
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow

VARIANTS = {
    "scratch": ["model.pretrained=false"],
    "imagenet": ["model.pretrained=true"],
    "imagenet + freeze 1 epoch": ["model.pretrained=true", "model.freeze_backbone_epochs=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights-dir", default="../shared/weights")
    parser.add_argument("--data-root", default="../shared/data/chest_xray_224")
    parser.add_argument("--out", type=Path, default=Path("outputs/transfer_benchmark"))
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.out.resolve()}/mlflow.db"
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        cmd = [
            sys.executable, "-m", "xrayfusion.train", "model=single", f"model.branches=[{args.backbone}]",
            f"model.weights_dir={Path(args.weights_dir).resolve()}", "data=kermany", f"data.root={args.data_root}",
            f"data.image_size={args.size}", f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
            f"logger.run_name={name}", f"paths.mlruns_dir={args.out.resolve()}",
            f"hydra.run.dir={args.out.resolve()}/{name.replace(' ', '_')}", *overrides,
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        print(f"{name}: {time.perf_counter() - started:.0f} s in all", flush=True)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id], order_by=["start_time"])
    print(f"\n{args.backbone}, data=kermany, {args.size} px, {args.epochs} epochs\n")
    print("| variant | test acc | test AUROC | best val AUROC | fit wall time (s) |\n| --- | --- | --- | --- | --- |")
    for run in runs:
        m = run.data.metrics
        print(
            f"| {run.info.run_name} | {m.get('test/fused/acc', float('nan')):.3f} | "
            f"{m.get('test/fused/auroc', float('nan')):.3f} | {max_val(client, run):.3f} | "
            f"{m.get('time/fit_seconds', float('nan')):.0f} |"
        )


def max_val(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> float:
    history = client.get_metric_history(run.info.run_id, "val/fused/auroc")
    return max((h.value for h in history), default=float("nan"))


if __name__ == "__main__":
    main()
