"""The one error wrapper of every entry point: one line `xrayfusion: error: ...`, exit 2, never a traceback."""

from __future__ import annotations

import mlflow
import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from tests.conftest import SMALL_SYNTHETIC, compose_config
from xrayfusion.core.cli import error_message
from xrayfusion.core.errors import did_you_mean
from xrayfusion.training.resume import FAILURE_TAG


def test_did_you_mean_names_the_close_key_only() -> None:
    assert did_you_mean("max_epoch", ["max_epochs", "min_epochs"]) == " (did you mean max_epochs?)"
    assert did_you_mean("zzz", ["max_epochs"]) == ""


def test_a_mistyped_key_suggests_the_close_one() -> None:
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        compose_config("train", ["trainer.max_epoch=1"])
    assert error_message(err.value) == "trainer.max_epoch is not a config key (did you mean trainer.max_epochs?)"


def test_an_unknown_key_without_a_close_one_says_how_to_add_it() -> None:
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        compose_config("compare", ["tags.owner=me"])
    message = error_message(err.value)
    assert message.startswith("tags.owner is not a config key") and "+tags.owner=<value>" in message


def test_compare_takes_the_documented_tag_overrides() -> None:
    cfg = compose_config("compare", ["tags.fusion=stacking", "tags.data=kermany"])
    assert cfg.tags.fusion == "stacking" and cfg.tags.branches is None


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("xrayfusion: error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Error executing job" not in result.stderr  # Hydra's own report is not printed on top
    return lines[0]


@pytest.mark.slow
def test_a_bad_trainer_key_fails_the_run_with_its_reason(cli_in_process, tracking_uri: str) -> None:
    line = _one_error_line(cli_in_process([*SMALL_SYNTHETIC, "+trainer.max_epoch=1"]))
    assert "trainer.max_epoch" in line and "did you mean trainer.max_epochs" in line
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    assert run.info.status == "FAILED" and "trainer.max_epoch" in run.data.tags[FAILURE_TAG]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("train", ["trainer.max_epoch=1"], "did you mean trainer.max_epochs"),
        ("train", ["fusion=stackin"], "fusion=stackin is not an option"),
        ("compare", ["tags.fusion=stacking"], "no MLflow store at"),
        ("predict", ["run_id=0123abcd"], "inputs is required; pass inputs="),
        ("evaluate", ["run_id=0123abcd"], "run_id=0123abcd: no MLflow store at"),
        ("data", ["data=kermany", "data.root=/no/such/folder"], "data.root=/no/such/folder does not exist"),
    ],
)
def test_every_entry_point_prints_one_line_and_exits_2(
    cli_in_process, module: str, args: list[str], needle: str
) -> None:
    assert needle in _one_error_line(cli_in_process(args, module=module))
