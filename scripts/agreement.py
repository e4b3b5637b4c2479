"""Does a trained run's model do what the run logged? Its logged test probabilities (`test_predictions.csv`) side
by side with evaluate's, predict's and the served pyfunc model's for the same images, and the logged test metrics
and branch diversity against evaluate's recomputation: prints the largest difference of each.

    python scripts/agreement.py <run id> --data-root ../shared/data/chest_xray_224 [--device cuda]

Reads the run (MLFLOW_TRACKING_URI, default ./mlruns/mlflow.db, where the project's commands run from this folder
write) and logs nothing into it. `--max-diff 1e-5` makes it a check: exit 1 when any difference is larger.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from xrayfusion.core.cli import one_line_errors
from xrayfusion.core.errors import DataError
from xrayfusion.core.names import DIVERSITY


def keyed(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows indexed by class folder + file name: the same image whatever the root it was read from."""
    return frame.set_index(frame[column].map(lambda p: "/".join(Path(str(p)).parts[-2:])))


def as_logged(rows: pd.DataFrame) -> pd.DataFrame:
    """predict's and the served model's rows (`path`, `<model>_prob_<class>`) keyed and named as the logged ones."""
    return keyed(rows, "path").rename(columns=lambda c: c.replace("_prob_", "/"))


def largest_difference(logged: pd.DataFrame, other: pd.DataFrame, columns: Sequence[str]) -> float:
    """max |logged - other| over the probability columns of every logged image (both keyed alike)."""
    missing = logged.index.difference(other.index)
    if len(missing):
        raise DataError(
            f"{len(missing)} logged test images are not under --data-root (e.g. {missing[0]}): pass the Kermany folder "
            "the run was trained and tested on"
        )
    return float(np.abs(logged[columns].to_numpy() - other.loc[logged.index, columns].to_numpy()).max())


def value_difference(logged: Mapping[str, float], recomputed: Mapping[str, float], what: str) -> float:
    """max |logged - recomputed| over the recomputed values; a value one side has and the other lacks (or has as
    NaN) counts as an infinite difference; a recomputed value the run never logged is a DataError."""
    unlogged = [k for k, v in recomputed.items() if math.isfinite(v) and k not in logged]
    if unlogged:
        raise DataError(
            f"the run logged no {unlogged[0]} ({what}): it was trained before xrayfusion logged it; retrain it to check"
        )
    diffs = [
        abs(logged[k] - v) if math.isfinite(v) else (math.inf if math.isfinite(logged.get(k, math.nan)) else 0.0)
        for k, v in recomputed.items()
    ]
    return max(diffs, default=0.0)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_id", help="the MLflow run (a unique prefix is enough)")
    p.add_argument("--data-root", required=True, help="the Kermany folder the run was trained on (train/, test/)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-diff", type=float, default=None, help="exit 1 when any difference is larger (or NaN)")
    args = p.parse_args(argv)

    import mlflow
    from bench.common import compose_cfg
    from omegaconf import OmegaConf

    from xrayfusion import tracking
    from xrayfusion.evaluation import loading
    from xrayfusion.evaluation.evaluate import evaluate_model
    from xrayfusion.evaluation.predict import predict_files

    # MLFLOW_TRACKING_URI, else the store the project's commands write from this folder (conf/logger/mlflow.yaml)
    uri = tracking.resolve_tracking_uri(f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}")
    run_id = tracking.resolve_run_id(uri, args.run_id)
    run = mlflow.MlflowClient(uri).get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="test_predictions.csv", dst_path=tmp, tracking_uri=uri
            )
        except (mlflow.exceptions.MlflowException, OSError) as err:
            raise DataError(
                f"run {run_id[:8]} has no test_predictions.csv (trained with test=false?): nothing logged to check "
                f"against ({type(err).__name__})"
            ) from err
        logged = keyed(pd.read_csv(path), "name")
    columns = [c for c in logged.columns if "/" in c]  # <model>/<class>
    model = loading.resolve_classifier(run_id, None, uri, args.device)
    print(f"run {run_id[:8]}: {len(logged)} logged test images, {len(columns)} probability columns, {args.device}")
    rows: list[tuple[str, float, float]] = []  # (against what, max abs difference, seconds)

    start = time.perf_counter()
    # the data config `python -m xrayfusion.evaluate data=kermany data.root=...` composes
    data_cfg = OmegaConf.to_container(compose_cfg(["data=kermany", f"data.root={args.data_root}"]).data, resolve=True)
    evaluation = evaluate_model(model, data_cfg, "test", n_bootstrap=0, batch_size=args.batch_size)
    evaluated = keyed(evaluation.predictions, "name")
    rows.append(("evaluate", largest_difference(logged, evaluated, columns), time.perf_counter() - start))
    recomputed = {f"test/{r.model}/{r.metric}": r.value for r in evaluation.results.itertuples()}
    metric_diff = value_difference(run.data.metrics, recomputed, "test metric")
    diversity = {f"test/{DIVERSITY}/{k}": v for k, v in evaluation.diversity.items()}
    diversity_diff = value_difference(run.data.metrics, diversity, "test branch diversity")

    split_dir = next((d for d in (Path(args.data_root) / "test", Path(args.data_root) / "testing") if d.is_dir()), None)
    if split_dir is None:
        raise DataError(f"--data-root {args.data_root} has no test/ folder: pass the Kermany folder of the run")
    paths = [str(split_dir / name) for name in logged.index]
    start = time.perf_counter()
    predicted = as_logged(predict_files(model, paths, args.batch_size))
    rows.append(("predict", largest_difference(logged, predicted, columns), time.perf_counter() - start))

    start = time.perf_counter()
    served_model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # on the CPU, as MLflow serves it
    served = as_logged(served_model.predict(pd.DataFrame({"path": paths})))
    rows.append(("served pyfunc model", largest_difference(logged, served, columns), time.perf_counter() - start))

    print("| against the run's logged test pass | max abs difference of probabilities | seconds |")
    print("|---|---|---|")
    for name, diff, seconds in rows:
        print(f"| {name} | {diff:.3g} | {seconds:.1f} |")
    print(f"logged test metrics vs evaluate's recomputation: max abs difference {metric_diff:.3g}")
    print(f"logged test branch diversity vs evaluate's: max abs difference {diversity_diff:.3g}")
    if args.max_diff is not None:
        worst = max([d for _, d, _ in rows] + [metric_diff, diversity_diff], key=lambda d: math.inf if d != d else d)
        if not worst <= args.max_diff:  # NaN fails too (an image predict could not read)
            print(f"agreement: FAILED, a difference of {worst:.3g} is over --max-diff {args.max_diff:g}")
            sys.exit(1)
        print(f"agreement: every difference within --max-diff {args.max_diff:g}")


if __name__ == "__main__":
    one_line_errors(main)()  # bad input (an unknown run, other data): one line, exit 2
