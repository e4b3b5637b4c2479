"""Comparison: filters, rows per run and branch, sorting, intervals in the table, plots; read from a tmp store."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from tests.evaluation.test_evaluation import random_predictions
from xrayfusion.core.errors import ConfigError
from xrayfusion.evaluation import compare as comparison
from xrayfusion.evaluation import metrics as evaluation


def fill_store(uri: str, tmp_path) -> dict[str, str]:
    """Two finished runs with validation scores, test metrics (one with intervals) and test predictions."""
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("xrayfusion", artifact_location=(tmp_path / "artifacts").as_uri())
    ids = {}
    for name, fusion, auroc, score in (("weak", "average", 0.61, 0.99), ("strong", "stacking", 0.93, 0.95)):
        run = client.create_run(exp, run_name=name, tags={"fusion": fusion, "branches": "resnet18,small_cnn"})
        client.log_metric(run.info.run_id, "selection/score", score)  # validation: weak looked better there
        for model, offset in (("fused", 0.0), ("resnet18", -0.05), ("small_cnn", -0.1)):
            client.log_metric(run.info.run_id, f"test/{model}/auroc", auroc + offset)
            client.log_metric(run.info.run_id, f"test/{model}/acc", 0.5 + offset)
        if name == "strong":
            client.log_metric(run.info.run_id, "test/fused/auroc_ci_low", 0.88)
            client.log_metric(run.info.run_id, "test/fused/auroc_ci_high", 0.97)
        labels, probs = random_predictions(40, seed=len(name))
        frame = evaluation.predictions_frame([str(i) for i in range(40)], labels, {"fused": probs}, ["n", "p"])
        path = tmp_path / f"{name}.csv"
        frame.to_csv(path, index=False)
        client.log_artifact(run.info.run_id, str(path))  # any name: only test_predictions.csv is read
        if name == "strong":
            frame.to_csv(tmp_path / "test_predictions.csv", index=False)
            client.log_artifact(run.info.run_id, str(tmp_path / "test_predictions.csv"))
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    return ids


def test_build_filter_joins_tags_and_filter() -> None:
    assert comparison.build_filter({"fusion": "stacking"}, None) == "tags.`fusion` = 'stacking'"
    got = comparison.build_filter({"data": "kermany"}, "metrics.`test/fused/auroc` > 0.8")
    assert got == "tags.`data` = 'kermany' and metrics.`test/fused/auroc` > 0.8"
    assert comparison.build_filter({}, "a = 1 or b = 2") == "(a = 1 or b = 2)"


def test_compare_runs_table_plots_and_read_only(tmp_path, tracking_uri: str) -> None:
    ids = fill_store(tracking_uri, tmp_path)
    client = mlflow.MlflowClient(tracking_uri)
    before = {i: client.get_run(i).data for i in ids.values()}
    runs = comparison.search_runs(tracking_uri, "xrayfusion")
    frame = comparison.comparison_frame(runs, "test", ["acc", "auroc"], branches=True, sort_by="auroc")
    assert list(frame["run_name"]) == ["strong"] * 3 + ["weak"] * 3
    assert list(frame["model"][:3]) == ["fused", "resnet18", "small_cnn"]
    ascending = comparison.comparison_frame(runs, "test", ["auroc"], sort_by="auroc", ascending=True)
    assert list(ascending["run_name"]) == ["weak", "strong"] and list(ascending["model"]) == ["fused", "fused"]
    table = comparison.markdown_table(frame, ["acc", "auroc"])
    assert "0.930 [0.880, 0.970]" in table and "| weak" in table and table.count("\n") == 7
    header, rows = table.splitlines()[0], table.splitlines()[2:]
    assert "| val_score " in header and [r.count("| 0.9500 ") + r.count("| 0.9900 ") for r in rows] == [1, 0, 0] * 2
    # by default runs are ranked on validation (what a recipe is chosen on), not on the test metrics shown
    default = comparison.comparison_frame(runs, "test", ["acc", "auroc"])
    assert list(default["run_name"]) == ["weak", "strong"] and list(default["val_score"]) == [0.99, 0.95]
    only = comparison.search_runs(tracking_uri, "xrayfusion", {"fusion": "stacking"})
    assert [r.info.run_name for r in only] == ["strong"]
    filtered = comparison.search_runs(tracking_uri, "xrayfusion", None, "metrics.`test/fused/auroc` < 0.7")
    assert [r.info.run_name for r in filtered] == ["weak"]
    with pytest.raises(ConfigError, match="experiment"):
        comparison.search_runs(tracking_uri, "nope")
    with pytest.raises(ConfigError, match="filter"):
        comparison.search_runs(tracking_uri, "xrayfusion", None, "metrics.auroc >>> 1")
    with pytest.raises(ConfigError, match="sort_by=auroc is neither val_score"):
        comparison.comparison_frame(runs, "test", ["acc"], sort_by="auroc")
    assert comparison.load_predictions(tracking_uri, ids["weak"], "test") is None
    preds = comparison.load_predictions(tracking_uri, ids["strong"], "test")
    assert isinstance(preds, pd.DataFrame) and len(preds) == 40
    fig = comparison.roc_figure({"strong": preds})
    assert "strong (AUC" in fig.axes[0].get_legend().get_texts()[0].get_text()
    bars = comparison.bar_figure(frame, ["acc", "auroc"])
    assert len(bars.axes[0].patches) == 2 * len(frame)
    assert {i: client.get_run(i).data for i in ids.values()}.keys() == before.keys()
    for run_id, data in before.items():
        after = client.get_run(run_id).data
        assert after.metrics == data.metrics and after.params == data.params and after.tags == data.tags


def test_val_score_sorts_in_the_direction_its_runs_logged_and_mixed_sources_are_warned(
    tmp_path, tracking_uri: str, caplog
) -> None:
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.create_experiment("xrayfusion", artifact_location=(tmp_path / "artifacts").as_uri())
    for name, loss in (("high_loss", 0.4), ("low_loss", 0.2)):  # optimized_metric=val/loss optimized_mode=min
        run_id = client.create_run(exp, run_name=name).info.run_id
        client.log_metric(run_id, "selection/score", loss)
        client.log_param(run_id, "selection/source", "best/val/loss")
        client.log_param(run_id, "selection/mode", "min")
        client.log_metric(run_id, "test/fused/auroc", 0.9)
    runs = comparison.search_runs(tracking_uri, "xrayfusion")
    assert list(comparison.comparison_frame(runs, "test", ["auroc"])["run_name"]) == ["low_loss", "high_loss"]
    assert "do not compare" not in caplog.text
    run_id = client.create_run(exp, run_name="auroc_run").info.run_id
    client.log_metric(run_id, "selection/score", 0.99)
    client.log_param(run_id, "selection/source", "fusion/val_auroc")
    client.log_param(run_id, "selection/mode", "max")
    frame = comparison.comparison_frame(comparison.search_runs(tracking_uri, "xrayfusion"), "test", ["auroc"])
    assert list(frame["run_name"]) == ["auroc_run", "high_loss", "low_loss"]  # mixed directions: descending
    assert "val_score comes from different metrics (['best/val/loss', 'fusion/val_auroc'])" in caplog.text


def test_runs_validation_cannot_tell_apart_are_named(tmp_path, tracking_uri: str) -> None:
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.create_experiment("xrayfusion", artifact_location=(tmp_path / "artifacts").as_uri())

    def log_run(
        name: str, score: float, interval=None, source="fusion/val_auroc", data="k", fit=None, folds=None
    ) -> str:
        run_id = client.create_run(exp, run_name=name, tags={"data": data}).info.run_id
        client.log_metric(run_id, "selection/score", score)
        for metric, seconds in (("time/fit_seconds", fit), ("time/crossfit_seconds", folds)):
            if seconds is not None:
                client.log_metric(run_id, metric, seconds)
        for suffix, value in zip(("low", "high"), interval or (), strict=False):
            client.log_metric(run_id, f"selection/score_ci_{suffix}", value)
        client.log_param(run_id, "selection/source", source)
        client.log_metric(run_id, "test/fused/auroc", 0.9)
        return run_id

    log_run("leader", 0.9994, (0.9983, 0.9999), fit=1600)
    close_id = log_run("close", 0.9986, (0.9970, 0.9996), fit=1100, folds=200)  # its cost: fit + cross-fit folds
    log_run("far", 0.9900, (0.985, 0.994), fit=50)  # the cheapest, but validation tells it apart: not named
    log_run("no_interval", 0.9990, fit=1400)  # logged before intervals: inside the leader's, so named too
    log_run("other_data", 0.9990, (0.998, 1.0), data="other")  # another validation set: does not compare
    frame = comparison.comparison_frame(comparison.search_runs(tracking_uri, "xrayfusion"), "test", ["auroc"])
    assert list(frame["run_name"])[0] == "leader" and list(frame["run_name"])[-1] == "far"
    table = comparison.markdown_table(frame, ["auroc"])
    assert "0.9994 [0.9983, 0.9999]" in table and "0.9986 [0.9970, 0.9996]" in table
    line = comparison.validation_ties(frame)
    assert line is not None and line.startswith("validation cannot tell leader (") and "[0.9983, 0.9999]" in line
    assert "close (" in line and "0.9986" in line and "no_interval (" in line
    assert "far" not in line and "other_data" not in line
    assert line.endswith(
        f"; the quickest of them to train is close ({close_id[:8]}, 1300 s against 1600 s): prefer it "
        "while validation cannot rank them"
    )
    costs = dict(zip(frame["run_name"], frame["train_seconds"].fillna(-1), strict=True))
    assert costs == {"leader": 1600, "close": 1300, "far": 50, "no_interval": 1400, "other_data": -1}  # no fit time
    assert "train_seconds" in table.splitlines()[0]
    pair = frame[frame["run_name"].isin(["leader", "no_interval"])].copy()
    pair.loc[pair["run_name"] == "no_interval", "train_seconds"] = 1700
    slower = comparison.validation_ties(pair)
    assert slower is not None and "no_interval (" in slower and "quickest" not in slower  # tied, but not cheaper
    assert comparison.validation_ties(frame[~frame["run_name"].isin(["close", "no_interval"])]) is None  # far: outside
    log_run("loss_run", 0.99925, (0.999, 0.9995), source="best/val/loss")  # another metric: does not compare
    log_run("top_without_interval", 0.9999)  # the best-scored run has no interval: nothing to say
    frame = comparison.comparison_frame(comparison.search_runs(tracking_uri, "xrayfusion"), "test", ["auroc"])
    assert comparison.validation_ties(frame) is None
