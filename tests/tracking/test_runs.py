"""Run ids that work: a unique prefix resolves, an ambiguous one lists the candidates; no empty stores."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from xrayfusion import tracking
from xrayfusion.core.errors import ConfigError


def _store(tmp_path: Path) -> tuple[str, list[str]]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("xrayfusion", artifact_location=(tmp_path / "a").as_uri())
    return uri, [client.create_run(exp, run_name=f"r{i}").info.run_id for i in range(3)]


def test_a_unique_prefix_resolves_to_the_full_run_id(tmp_path: Path) -> None:
    uri, ids = _store(tmp_path)
    for run_id in ids:
        assert tracking.resolve_run_id(uri, run_id) == run_id
        assert tracking.resolve_run_id(uri, run_id[:8]) == run_id
        assert tracking.resolve_run_id(uri, run_id[:8].upper()) == run_id
    unused = next(p for p in ("ffffffff", "eeeeeeee") if not any(i.startswith(p) for i in ids))
    with pytest.raises(ConfigError, match=f"resume_run_id={unused} is not a run in"):
        tracking.resolve_run_id(uri, unused, key="resume_run_id")
    with pytest.raises(ConfigError, match="not a run id or a prefix"):
        tracking.resolve_run_id(uri, "xyz!")


def test_an_ambiguous_prefix_lists_the_candidates(tmp_path: Path, monkeypatch) -> None:
    uri, _ = _store(tmp_path)
    runs = [SimpleNamespace(info=SimpleNamespace(run_id=f"abcd{d * 28}", run_name=f"run{d}")) for d in "12"]
    page = type("Page", (list,), {"token": None})(runs)
    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", lambda self, *a, **k: page)
    with pytest.raises(ConfigError, match=r"run_id=abcd matches 2 runs: abcd1+ \(run1\), abcd2+ \(run2\)"):
        tracking.resolve_run_id(uri, "abcd")


def test_read_only_commands_never_create_an_empty_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    with pytest.raises(ConfigError, match=r"no MLflow store at .*elsewhere/mlflow.db .*MLFLOW_TRACKING_URI"):
        tracking.require_store(uri)
    with pytest.raises(ConfigError, match="run_id=0123abcd: no MLflow store"):
        tracking.resolve_run_id(uri, "0123abcd")
    assert not (tmp_path / "elsewhere").exists()
