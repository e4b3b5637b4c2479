"""Does a trained run's model do what the run logged? Its logged test probabilities (`test_predictions.csv`) side
by side with evaluate's, predict's and the served pyfunc model's for the same images, and the logged test metrics
and branch diversity against evaluate's recomputation: prints the largest difference of each.

    python scripts/agreement.py <run id> --data-root ../shared/data/chest_xray_224 [--device cuda]

Reads the run (MLFLOW_TRACKING_URI, default the project's mlruns/mlflow.db) and logs nothing into it.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from xrayfusion.core.cli import one_line_errors
from xrayfusion.core.errors import DataError


def keyed(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows indexed by class folder + file name: the same image whatever the root it was read from."""
    return frame.set_index(frame[column].map(lambda p: "/".join(Path(str(p)).parts[-2:])))


def largest_difference(logged: pd.DataFrame, other: pd.DataFrame, columns: Sequence[str]) -> float:
    """max |logged - other| over the probability columns of every logged image (both keyed alike)."""
    missing = logged.index.difference(other.index)
    if len(missing):
        raise DataError(
            f"{len(missing)} logged test images are not under --data-root (e.g. {missing[0]}): pass the Kermany folder "
            "the run was trained and tested on"
        )
    return float(np.abs(logged[columns].to_numpy() - other.loc[logged.index, columns].to_numpy()).max())


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_id", help="the MLflow run (a unique prefix is enough)")
    p.add_argument("--data-root", required=True, help="the Kermany folder the run was trained on (train/, test/)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    import mlflow
    from bench.common import compose_cfg
    from omegaconf import OmegaConf

    from xrayfusion import tracking
    from xrayfusion.evaluation import loading
    from xrayfusion.evaluation.evaluate import evaluate_model
    from xrayfusion.evaluation.predict import predict_files

    uri = tracking.resolve_tracking_uri(None)
    run_id = tracking.resolve_run_id(uri, args.run_id)
    run = mlflow.MlflowClient(uri).get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="test_predictions.csv", dst_path=tmp, tracking_uri=uri
        )
        logged = keyed(pd.read_csv(path), "name")
    columns = [c for c in logged.columns if "/" in c]  # <model>/<class>
    model = loading.resolve_classifier(run_id, None, uri, args.device)
    print(f"run {run_id[:8]}: {len(logged)} logged test images, {len(columns)} probability columns, {args.device}")
    rows = []

    start = time.perf_counter()
    # the data config `python -m xrayfusion.evaluate data=kermany data.root=...` composes
    data_cfg = OmegaConf.to_container(compose_cfg(["data=kermany", f"data.root={args.data_root}"]).data, resolve=True)
    evaluation = evaluate_model(model, data_cfg, "test", n_bootstrap=0, batch_size=args.batch_size)
    evaluated = keyed(evaluation.predictions, "name")
    metrics = run.data.metrics
    metric_diff = max(
        abs(metrics[f"test/{r.model}/{r.metric}"] - r.value)
        for r in evaluation.results.itertuples()
        if math.isfinite(r.value) and f"test/{r.model}/{r.metric}" in metrics
    )
    diversity_diff = max(
        (abs(metrics[f"test/diversity/{k}"] - v) for k, v in evaluation.diversity.items() if math.isfinite(v)),
        default=0.0,
    )
    rows.append(("evaluate", largest_difference(logged, evaluated, columns), time.perf_counter() - start))

    paths = [str(Path(args.data_root) / "test" / name) for name in logged.index]
    start = time.perf_counter()
    predicted = keyed(predict_files(model, paths, args.batch_size), "path")
    predicted = predicted.rename(columns=lambda c: c.replace("_prob_", "/"))
    rows.append(("predict", largest_difference(logged, predicted, columns), time.perf_counter() - start))

    start = time.perf_counter()
    served_model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    served = keyed(served_model.predict(pd.DataFrame({"path": paths})), "path")
    served = served.rename(columns=lambda c: c.replace("_prob_", "/"))
    rows.append(("served pyfunc model", largest_difference(logged, served, columns), time.perf_counter() - start))

    print("| against the run's logged test pass | max abs difference of probabilities | seconds |")
    print("|---|---|---|")
    for name, diff, seconds in rows:
        print(f"| {name} | {diff:.3g} | {seconds:.1f} |")
    print(f"logged test metrics vs evaluate's recomputation: max abs difference {metric_diff:.3g}")
    print(f"logged test branch diversity vs evaluate's: max abs difference {diversity_diff:.3g}")


if __name__ == "__main__":
    one_line_errors(main)()  # bad input (an unknown run, other data): one line, exit 2
