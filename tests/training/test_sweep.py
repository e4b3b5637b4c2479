"""Sweeps: sweep ids, threads per job, the summary table, the sweep configs, and sweeps through the CLI (Optuna
searches: test_search.py)."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import SMALL_SYNTHETIC
from xrayfusion.models.backbones import check_backbone_name
from xrayfusion.training import config as config_checks
from xrayfusion.training import sweep

CONF = str(Path(__file__).resolve().parents[2] / "conf")
SEED1_BRANCHES = [
    "vgg19",
    "resnetv2_152",
    "mobilenetv1_100",
    "inception_v3",
    "inception_resnet_v2",
    "legacy_xception",
    "densenet201",
    "small_cnn",
    "darknet",
]


def compose_train(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.mark.parametrize(
    ("n_jobs", "cores", "threads"), [(2, 16, 8), (3, 16, 5), (4, 2, 1), (-1, 16, 1), (-2, 8, 1), (None, 6, 6)]
)
def test_threads_per_job_share_the_cores(n_jobs: int | None, cores: int, threads: int) -> None:
    assert sweep.threads_per_job(n_jobs, cores) == threads


def test_sweep_ids_are_unique_and_name_the_sweep_folder() -> None:
    ids = {sweep.new_sweep_id("multirun/2026-01-02/10-11-12") for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("10-11-12-") for i in ids)


def test_sweep_tags_only_for_sweep_jobs() -> None:
    assert sweep.sweep_tags(None, 3) == {}
    assert sweep.sweep_tags("s1", "") == {"sweep_id": "s1"}
    assert sweep.sweep_tags("s1", 2) == {"sweep_id": "s1", "sweep_job": "2"}
    assert sweep.best_metric("val/fused/auroc", None) == {}
    assert sweep.best_metric("val/fused/auroc", 0.5) == {"best/val/fused/auroc": 0.5}


def _runs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run": ["a", "b", "c"],
            "run_id": ["0123abcd" + "0" * 24, "8e123456" + "1" * 24, "fedcba98" + "2" * 24],
            "status": ["FINISHED", "FINISHED", "FAILED"],
            "start_time": [1, 2, 3],
            "tags.sweep_job": ["0", "1", "2"],
            "params.fusion/name": ["average", "stacking", "voting"],
            "params.seed": ["42", "42", "42"],
            "params.fusion/C": [None, "1.0", None],
            "params.paths/output_dir": ["/o/0", "/o/1", "/o/2"],
            "metrics.best/val/fused/auroc": [0.7, 0.9, np.nan],
            "metrics.test/fused/acc": [0.6, 0.8, np.nan],
        }
    )


@pytest.mark.parametrize(("mode", "order"), [("max", ["b", "a", "c"]), ("min", ["a", "b", "c"])])
def test_summary_table_shows_what_the_sweep_varied_best_first(mode: str, order: list[str]) -> None:
    table = sweep.summary_table(_runs(), "val/fused/auroc", mode)
    assert list(table["run"]) == order
    assert list(table.columns) == [
        "run",
        "run_id",
        "job",
        "status",
        "fusion/name",
        "best/val/fused/auroc",
        "test/fused/acc",
    ]
    md = sweep.markdown_table(table).splitlines()
    assert md[0] == "| run | run_id | job | status | fusion/name | best/val/fused/auroc | test/fused/acc |"
    assert md[2 if mode == "max" else 3] == "| b | 8e123456 | 1 | FINISHED | stacking | 0.9 | 0.8 |"  # not a float
    assert md[-1].startswith("| c | fedcba98 | 2 | FAILED | voting |  |")


def test_summary_table_ranks_on_the_selection_score_not_the_pre_fit_epoch() -> None:
    """A fitted fusion is ranked on what it scores after its fit (selection/score), not on the best epoch before."""
    runs = _runs().assign(**{"metrics.selection/score": [0.95, 0.8, np.nan]})
    table = sweep.summary_table(runs, "val/fused/auroc", "max")
    assert list(table["run"]) == ["a", "b", "c"]  # b has the better best epoch (0.9 > 0.7), a the better score
    assert list(table.columns)[4:7] == ["fusion/name", "selection/score", "best/val/fused/auroc"]
    # the score's interval, when the runs logged one, sits beside it
    interval = {
        "metrics.selection/score_ci_low": [0.9, 0.7, np.nan],
        "metrics.selection/score_ci_high": [1.0, 0.9, np.nan],
    }
    table = sweep.summary_table(runs.assign(**interval), "val/fused/auroc", "max")
    assert list(table.columns)[5:8] == ["selection/score", "selection/score_ci_low", "selection/score_ci_high"]
    # what each run's training cost: the fit, and the cross-fit folds' trainings when a run had them
    cost = {"metrics.time/fit_seconds": [100.0, 50.0, np.nan], "metrics.time/crossfit_seconds": [np.nan, 400.0, np.nan]}
    table = sweep.summary_table(runs.assign(**cost), "val/fused/auroc", "max")
    assert list(table.columns)[-2:] == ["time/fit_seconds", "time/crossfit_seconds"]


@pytest.mark.parametrize(
    ("metric", "best", "fused", "expected"),
    [
        ("val/fused/auroc", 0.9, 0.95, (0.95, "fusion/val_auroc")),
        ("val/fused/auroc", 0.9, float("nan"), (0.9, "best/val/fused/auroc")),  # one class on validation
        ("val/fused/auroc", 0.9, None, (0.9, "best/val/fused/auroc")),
        ("val/loss", 0.3, 0.95, (0.3, "best/val/loss")),  # no post-fit counterpart: the best epoch's value
        ("val/loss", None, 0.95, (None, "best/val/loss")),
    ],
)
def test_selection_score(metric: str, best: float | None, fused: float | None, expected: tuple) -> None:
    assert sweep.selection_score(metric, best, fused) == expected


def test_summary_of_no_runs_is_an_empty_table(tmp_path: Path) -> None:
    table = sweep.summary_table(pd.DataFrame(), "val/fused/auroc")
    assert table.empty and list(table.columns) == ["run", "run_id", "status"]
    md, csv = sweep.write_summary(table, tmp_path)
    assert md.read_text().startswith("| run | run_id | status |") and csv.exists()


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher"), ("slurm_gpu", "SlurmLauncher")],
)
def test_launchers_compose(launcher: str, target: str) -> None:
    cfg = compose_train(f"hydra/launcher={launcher}", hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.callbacks.sweep._target_ == "xrayfusion.training.sweep.SweepCallback"
    if launcher == "slurm_gpu":
        assert cfg.hydra.launcher.gpus_per_node == 1


def test_seed_experiments_compose() -> None:
    seed1 = compose_train("experiment=seed1_keras_ensemble")
    assert list(seed1.model.branches) == SEED1_BRANCHES and seed1.fusion.name == "concat"
    for name in SEED1_BRANCHES:
        check_backbone_name(name)
    seed2 = compose_train("experiment=seed2_resnet_mobilenet", hydra_cfg=True)
    assert list(seed2.model.branches) == ["resnet18", "mobilenetv2_100"] and seed2.fusion.name == "average"
    assert seed2.hydra.sweeper.params.fusion == "average,stacking"


@pytest.mark.slow
def test_seed1_every_branch_takes_one_channel_at_the_experiment_size() -> None:
    cfg = compose_train("experiment=seed1_keras_ensemble")
    assert cfg.data.image_size == 224 and cfg.model.in_chans == 1
    config_checks.validate(cfg)  # builds each backbone and runs a 1-image forward pass at that size


def _sweep_runs(tracking_uri: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])


@pytest.mark.slow
def test_multirun_tags_each_job_with_one_sweep_id_and_prints_the_table(run_cli, tracking_uri, tmp_path) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_cli(["-m", "experiment=seed2_resnet_mobilenet", *SMALL_SYNTHETIC, f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _sweep_runs(tracking_uri)
    assert len(runs) == 2 and {r.data.tags["fusion"] for r in runs} == {"average", "stacking"}
    sweep_ids = {r.data.tags["sweep_id"] for r in runs}
    assert len(sweep_ids) == 1 and {r.data.tags["sweep_job"] for r in runs} == {"0", "1"}
    (sweep_id,) = sweep_ids
    assert f"Sweep {sweep_id}: 2 runs" in result.stdout
    summary = (sweep_dir / "sweep_summary.md").read_text()
    assert "| stacking |" in summary and "| average |" in summary and "best/val/fused/auroc" in summary
    assert "selection/score" in summary
    for run in runs:  # the logged best is the best epoch of the per-epoch series
        history = mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "val/fused/auroc")
        assert run.data.metrics["best/val/fused/auroc"] == pytest.approx(max(m.value for m in history))


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep_the_way_slurm_would(run_cli, tracking_uri, tmp_path) -> None:
    """hydra/launcher=submitit_local: each job is a submitit job in its own process, as on a Slurm cluster."""
    sweep_dir = tmp_path / "multirun"
    args = ["-m", "hydra/launcher=submitit_local", "fusion=average,voting", "model.branches=[small_cnn,darknet]"]
    result = run_cli([*args, *SMALL_SYNTHETIC, f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    runs = _sweep_runs(tracking_uri)
    assert sorted(r.data.tags["fusion"] for r in runs) == ["average", "voting"]
    assert all(r.info.status == "FINISHED" for r in runs) and len({r.data.tags["sweep_id"] for r in runs}) == 1
    assert len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 2  # submitit's own record of each job
    summary = (sweep_dir / "sweep_summary.md").read_text()
    assert all(r.info.run_id[:8] in summary for r in runs)  # the run_id column evaluate and predict accept
