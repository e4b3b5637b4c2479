"""Optuna searches (`python -m xrayfusion.search`): the search space, the study's table, and searches that
resume and prune, end to end in-process on tiny synthetic data."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import SMALL_SYNTHETIC, compose_config, free_port
from xrayfusion.core.errors import ConfigError
from xrayfusion.training import search
from xrayfusion.training.search_space import check_keys, fixed_keys, override_value, parse_param, parse_space

# a tiny search: the branch set, fusion and batch size fixed on the command line (they leave the space)
TINY = [*SMALL_SYNTHETIC, "model.branches=[small_cnn,darknet]", "fusion=average", "fusion.weights=learned"]


# ---- the search space --------------------------------------------------------------------------------------
def test_default_space_names_train_keys_and_fixed_keys_leave_it() -> None:
    cfg = compose_config("search", ["seed=7"])
    params = parse_space(cfg.search_space)
    assert [p.key for p in params] == [
        "optimizer.lr",
        "optimizer.weight_decay",
        "data.batch_size",
        "model.drop_rate",
        "model.branches",
        "fusion",
    ]
    check_keys(params, compose_config("train", []))
    lr = params[0]
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 1e-4, 3e-3, True)
    fixed = fixed_keys(["fusion=stacking", "+model.branches=[resnet18]", "trainer.max_epochs=2"])
    assert [p.key for p in parse_space(cfg.search_space, fixed)][-2:] == ["data.batch_size", "model.drop_rate"]
    assert cfg.search.sampler.seed == 7
    assert isinstance(search.build_pruner(cfg.search.pruner), optuna.pruners.MedianPruner)


def test_a_list_choice_is_sampled_as_its_override_text_and_composes_to_the_list() -> None:
    spec = {"type": "categorical", "choices": [["resnet18", "small_cnn"], ["darknet"]]}
    branches = parse_param("model.branches", spec)
    assert branches.choices == ("[resnet18,small_cnn]", "[darknet]")
    override = branches.override("[resnet18,small_cnn]")
    assert override == "model.branches=[resnet18,small_cnn]"
    assert list(compose_config("train", [override]).model.branches) == ["resnet18", "small_cnn"]
    batch = parse_param("data.batch_size", {"type": "categorical", "choices": [16, 32]})
    assert batch.choices == (16, 32) and batch.override(32) == "data.batch_size=32"
    values = (1e-05, True, None, "a b", {"a": 1})
    assert [override_value(v) for v in values] == ["1e-05", "true", "null", "'a b'", "{a:1}"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"low": 1, "high": 2}, "type=None must be one of float, int, categorical"),
        ({"type": "gaussian"}, "must be one of float, int, categorical"),
        ({"type": "float", "low": 1e-3}, "needs low and high"),
        ({"type": "float", "low": 3, "high": 1}, "low=3 must be below high=1"),
        ({"type": "float", "low": 0, "high": 1, "log": True}, "log: true needs low > 0"),
        ({"type": "float", "low": "a", "high": 1}, "low='a' must be a number"),
        ({"type": "int", "low": 1, "high": 2.5}, "whole numbers"),
        ({"type": "float", "low": 0, "high": 1, "choices": [1]}, "choices is not a field of a float entry"),
        ({"type": "categorical", "choices": []}, "choices=[] must be a non-empty list"),
        ({"type": "categorical", "choices": [1, 1]}, "lists a choice twice"),
        ("uniform(0, 1)", "must be a mapping with a type"),
    ],
)
def test_bad_space_entries_name_the_key_and_the_fix(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"search_space\.x") as err:
        parse_param("x", spec)
    assert message in str(err.value)


def test_search_only_overrides_stay_out_of_the_trials_and_passwords_out_of_tags() -> None:
    given = ["search.n_trials=3", "search/pruner=none", "search_space=default", "fusion=voting", "seed=1"]
    # trials skip the test split unless the command asks for it
    assert search.trial_overrides(given) == ["test=false", "fusion=voting", "seed=1"]
    assert search.trial_overrides([*given, "test=true"]) == ["fusion=voting", "seed=1", "test=true"]
    assert (
        search.redact("postgresql://me:s3cret@db.example:5432/optuna") == "postgresql://me:***@db.example:5432/optuna"
    )
    assert search.redact("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


def test_trials_table_is_best_first_with_full_run_ids() -> None:
    study = optuna.create_study(direction="maximize")
    dist = {"fusion": optuna.distributions.CategoricalDistribution(["average", "voting"])}
    for value, fusion, state in ((0.7, "average", "COMPLETE"), (0.9, "voting", "COMPLETE"), (None, "voting", "PRUNED")):
        study.add_trial(
            optuna.trial.create_trial(
                params={"fusion": fusion},
                distributions=dist,
                value=value,
                state=optuna.trial.TrialState[state],
                user_attrs={"mlflow_run_id": f"{fusion}{value}".ljust(32, "0")},
                intermediate_values={0: 0.5} if value is None else {},
            )
        )
    table = search.trials_table(study)
    assert list(table.columns) == ["trial", "state", "run_id", "fusion", "value"]
    assert list(table["trial"]) == [1, 0, 2] and list(table["state"]) == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert table["run_id"][0] == "voting0.9".ljust(32, "0")  # the full id


# ---- end to end --------------------------------------------------------------------------------------------
def _runs(tracking_uri: str, study: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("xrayfusion").experiment_id
    return client.search_runs([experiment], f"tags.optuna_study = '{study}'")


def test_search_resumes_its_study_and_logs_every_trial(cli_in_process, tracking_uri, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/db/study.db"  # the folder does not exist yet
    args = [*TINY, f"search.storage={storage}", "search.study_name=tiny"]
    first = cli_in_process([*args, "search.n_trials=2"], module="search")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Study 'tiny'" in first.stdout and "2 trials (2 complete)" in first.stdout

    again = cli_in_process([*args, "search.n_trials=3"], module="search")  # the same command, one more trial
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials(states=search.FINISHED)
    assert [t.number for t in trials] == [0, 1, 2]
    assert set(study.trials[0].params) == {"optimizer.lr", "optimizer.weight_decay", "model.drop_rate"}
    assert len({t.params["optimizer.lr"] for t in trials}) == 3  # the resumed search samples anew

    runs = {r.info.run_id: r for r in _runs(tracking_uri, "tiny")}
    assert len(runs) == 3
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        tags = run.data.tags
        assert tags["optuna_trial"] == str(trial.number) and tags["sweep_id"] == "tiny"
        assert tags["optuna_storage"] == storage and tags["optuna_state"] == trial.state.name
        assert float(run.data.params["optimizer/lr"]) == pytest.approx(trial.params["optimizer.lr"])
        if trial.state.name == "COMPLETE":  # the objective: the final fused model's validation AUROC
            assert run.info.status == "FINISHED"
            assert run.data.metrics["selection/score"] == pytest.approx(trial.value)
            assert run.data.metrics["selection/score"] == run.data.metrics["fusion/val_auroc"]
        assert not any(k.startswith("test/") for k in run.data.metrics)  # trials never touch the test split
    summary = pd.read_csv(tmp_path / "outputs" / "run" / "search_summary.csv")
    assert list(summary["trial"].sort_values()) == [0, 1, 2] and set(summary["run_id"]) == set(runs)
    assert "best trial" in again.stdout and study.best_trial.user_attrs["mlflow_run_id"] in again.stdout
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert f"its test split, once: python -m xrayfusion.evaluate run_id={best_run} data=synthetic" in again.stdout

    done = cli_in_process([*args, "search.n_trials=3"], module="search")  # nothing missing: nothing runs
    assert done.returncode == 0 and len(optuna.load_study(study_name="tiny", storage=storage).trials) == 3


def test_a_pruned_trial_ends_its_run_killed_and_the_search_goes_on(cli_in_process, tracking_uri, tmp_path) -> None:
    # an AUROC never reaches 2: the threshold pruner prunes every trial after its first validation epoch
    args = [*TINY, "trainer.max_epochs=2", "search.n_trials=2", "search/pruner=threshold", "search.pruner.lower=2"]
    result = cli_in_process(args, module="search")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="xrayfusion-synthetic", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [0] for t in study.trials)  # stopped after epoch 0 of 2
    runs = _runs(tracking_uri, "xrayfusion-synthetic")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    for run in runs:
        assert run.data.tags["optuna_state"] == "PRUNED"
        assert run.data.tags["xrayfusion.stop_reason"].startswith("TrialPruned: trial ")
        assert not list(Path(run.data.tags["xrayfusion.checkpoint_dir"]).glob("*.ckpt"))  # cleaned
    assert "no trial completed yet" in result.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search_space.fusion.type=gaussian", "search_space.fusion.type='gaussian' must be one of"),
        ("search_space.fusion.choices=[average,avrage]", "fusion=avrage is not an option"),
        ("+search_space.seed={type:int,low:5,high:1}", "search_space.seed: low=5 must be below high=1"),
        ("+search_space.nope={type:float,low:0,high:1}", "nope is not a key of the train config"),
        ("search/pruner=threshold", "search.pruner (optuna.pruners.ThresholdPruner) cannot be built"),
        ("search.n_trials=0", "search.n_trials=0 must be a whole number >= 1"),
        ("trainer=ddp_cpu", "a search trains each trial in one process"),
    ],
)
def test_a_bad_search_config_is_one_line_and_exit_2(cli_in_process, tmp_path, override: str, message: str) -> None:
    result = cli_in_process(["data=synthetic", override], module="search")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("xrayfusion: error: ") and message in lines[-1], result.stderr[-2000:]
    assert not (tmp_path / "optuna.db").exists()  # checked before the study is opened


@pytest.mark.slow  # starts a server (about 5 s)
def test_optuna_dashboard_serves_a_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(storage=storage, study_name="browse-me").optimize(lambda t: t.suggest_float("x", 0, 1), 1)
    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen(
        [str(exe), storage, "--port", str(port), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline, body = time.monotonic() + 60, ""
        while time.monotonic() < deadline and "browse-me" not in body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    body = resp.read().decode()
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.3)
        assert "browse-me" in body
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_search_config_composes_every_train_group() -> None:
    cfg = compose_config("search", ["experiment=seed2_resnet_mobilenet", "trainer=cpu", "search/pruner=hyperband"])
    assert cfg.fusion.name == "average" and cfg.task_name == "search"
    assert OmegaConf.select(cfg, "search.pruner.max_resource") == cfg.trainer.max_epochs
    assert isinstance(search.build_pruner(cfg.search.pruner), optuna.pruners.HyperbandPruner)
    assert isinstance(search.build_sampler(cfg.search.sampler, 3), optuna.samplers.TPESampler)


def test_a_study_scored_the_old_way_is_refused_and_a_new_one_records_its_objective(tmp_path: Path) -> None:
    storage_url = f"sqlite:///{tmp_path}/optuna.db"
    cfg = compose_config("search", [f"search.storage={storage_url}", "search.study_name=old"])
    storage = optuna.storages.RDBStorage(storage_url)
    old = optuna.create_study(storage=storage, study_name="old", direction="maximize")
    old.set_user_attr("optimized_metric", "val/fused/auroc")  # what a study of the best-epoch objective had
    old.optimize(lambda trial: 0.5, n_trials=1)
    with pytest.raises(ConfigError, match="scored on the best epoch's val/fused/auroc .* pick another"):
        search.open_study(cfg, storage, [])
    cfg.search.study_name = "new"
    assert search.open_study(cfg, storage, []).user_attrs["objective"] == "selection/score"
    assert search.open_study(cfg, storage, []).study_name == "new"  # and it resumes
