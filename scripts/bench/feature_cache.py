"""feature-cache: the same ensemble trained with and without model.feature_cache, each by the train task of the
training command in this process (a fresh, empty feature cache each, so the cached runs pay for computing their
features), plus a 1-epoch cached run for the "N epochs vs 1 epoch" ratio. Prints the feature pass, epoch times,
fit and end-to-end wall times and the test AUROC side by side, read back from each run's MLflow metrics.

    python scripts/benchmark.py feature-cache                       # experiment=seed1_cpu, all files, 10 epochs
    python scripts/benchmark.py feature-cache --max-train 600 --epochs 3   # a quicker look
    python scripts/benchmark.py feature-cache --experiment kermany_frozen3 --fusion-cv 3 --max-train 600 --epochs 2

`--fusion-cv K` fits a stacking fusion on K-fold out-of-fold predictions in every run (fusion=stacking
fusion.cv=K): the folds train from the cache too and predict their held-out images from it, so the table's
cross-fit column shows what the cache saves there, and the out-of-fold predictions of the live and the cached
run are compared (largest difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_ROOT, REPO, compose_cfg, cpu_name, make_subset_root


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="seed1_cpu")
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument(
        "--weights-dir", default=os.environ.get("XRAYFUSION_WEIGHTS_DIR", str(REPO.parent / "shared" / "weights"))
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-train", type=int, default=None, help="stratified subset of train/ (default all)")
    p.add_argument("--max-test", type=int, default=None, help="stratified subset of test/ (default all)")
    p.add_argument("--no-live", action="store_true", help="skip the run without the cache (the slow one)")
    p.add_argument("--fusion-cv", type=int, default=None, help="fusion=stacking fusion.cv=K in every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run")


def _train(overrides: list[str], uri: str, tmp: Path, name: str) -> tuple[dict, float]:
    """Run the train task in this process on the composed config (the same `train()` the command runs, without
    a process start per run); returns ({metric: value, 'epochs': epoch times, 'params': ...}, end-to-end s)."""
    import mlflow

    from xrayfusion.training.run import train

    os.environ["MLFLOW_TRACKING_URI"] = uri
    cfg = compose_cfg(
        [
            *overrides,
            "trainer.enable_progress_bar=false",
            "tracking.log_model=false",
            "gradcam.n_images=0",
            f"logger.run_name={name}",
            f"paths.root_dir={tmp}",
            f"paths.output_dir={tmp}/{name}",
        ]
    )
    print(f"run {name}: {' '.join(overrides)}", flush=True)
    started = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - started
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("xrayfusion")
    [run] = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    values: dict = dict(run.data.metrics)
    values["epochs"] = [m.value for m in client.get_metric_history(run.info.run_id, "time/epoch_seconds")]
    values["params"] = run.data.params
    return values, wall


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="xrayfusion-featcache-") as tmp_name:
        tmp = Path(tmp_name)
        root = args.data_root
        counts = None
        if args.max_train or args.max_test:
            counts = make_subset_root(Path(root), tmp / "data", args.max_train, args.max_test, args.seed)
            root = str(tmp / "data")
        uri = f"sqlite:///{tmp}/mlflow.db"
        base = [
            f"experiment={args.experiment}",
            f"data.root={root}",
            f"model.weights_dir={args.weights_dir}",
            *(["fusion=stacking", f"fusion.cv={args.fusion_cv}"] if args.fusion_cv else []),
            *args.overrides,
        ]
        runs = [("live", False, args.epochs), ("cached", True, args.epochs), ("cached-1-epoch", True, 1)]
        if args.no_live:
            runs = runs[1:]
        print(f"machine: {cpu_name()}; experiment={args.experiment}; files {counts or 'all'}", flush=True)
        results = {}
        for name, cache, epochs in runs:
            overrides = [
                *base,
                f"model.feature_cache={str(cache).lower()}",
                f"trainer.max_epochs={epochs}",
                f"data.cache_dir={tmp}/cache-{name}",
            ]  # empty: the cached runs compute their features
            results[name] = (epochs, *_train(overrides, uri, tmp, name))
        params = next(iter(results.values()))[1]["params"]
        cached = results.get("cached", (0, {"params": {}}))[1]["params"].get("feature_cache/branches", "-")
        print(f"\nbranches {params.get('model/branches')}; cached branches: {cached}")
        print(
            "\n| run | epochs | feature pass s | epoch 1 s | later epochs s (median) | fit s | cross-fit s "
            "| end to end s | test fused auroc |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (epochs, values, wall) in results.items():
            times = values["epochs"]
            later = f"{statistics.median(times[1:]):.1f}" if len(times) > 1 else "-"
            feat = values.get("time/feature_cache_seconds")
            print(
                f"| {name} | {epochs} | {feat:.1f} | " if feat is not None else f"| {name} | {epochs} | - | ",
                end="",
            )
            crossfit = values.get("time/crossfit_seconds")
            print(
                f"{times[0]:.1f} | {later} | {values['time/fit_seconds']:.0f} | "
                f"{'-' if crossfit is None else f'{crossfit:.0f}'} | {wall:.0f} | "
                f"{values.get('test/fused/auroc', float('nan')):.3f} |"
            )
        if "cached" in results:
            n_wall, one_wall = results["cached"][2], results["cached-1-epoch"][2]
            print(f"\ncached: {args.epochs} epochs end to end / 1 epoch end to end = {n_wall / one_wall:.2f}")
        if "live" in results:
            print(f"live / cached end to end ({args.epochs} epochs) = {results['live'][2] / results['cached'][2]:.2f}x")
        if args.fusion_cv and "live" in results:
            print(
                f"out-of-fold predictions, live vs cached: largest difference {_oof_difference(tmp):.2e} "
                "(the two runs train alike only without augmentation: data.augment.enabled=false)"
            )


def _oof_difference(tmp: Path) -> float:
    """The largest difference between the live and the cached run's out-of-fold probabilities (same images)."""
    import pandas as pd

    live = pd.read_csv(tmp / "live" / "oof_predictions.csv").set_index("name")
    cached = pd.read_csv(tmp / "cached" / "oof_predictions.csv").set_index("name").loc[live.index]
    columns = [c for c in live.columns if "/" in c]
    return float((live[columns] - cached[columns]).abs().to_numpy().max())
