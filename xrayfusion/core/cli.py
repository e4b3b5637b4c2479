"""The one error wrapper of every entry point, and where the shipped configs are.

Hydra composition errors (an unknown option, a mistyped key, bad override syntax), OmegaConf errors
(a missing mandatory value) and XrayfusionErrors all become one line `xrayfusion: error: ...` and exit 2.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xrayfusion.core.errors import XrayfusionError, did_you_mean, fail


def config_dir() -> str:
    """The Hydra config folder: `xrayfusion/conf` of an installed package, else the checkout's top-level conf/."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "conf"
    return str(shipped if shipped.is_dir() else package.parent / "conf")


CONFIG_DIR = config_dir()


def _keys(node: Any) -> list[str]:
    try:
        return [str(k) for k in node.keys()]
    except Exception:  # not a mapping node
        return []


def _unknown_key_message(err: BaseException) -> str | None:
    """'a.b is not a key of a; did you mean a.c?' for an override of a key the config does not have."""
    cause = err.__cause__ or err.__context__
    full_key = getattr(cause, "full_key", None)
    if not full_key or "not in struct" not in str(cause):
        return None
    parent, _, leaf = str(full_key).rpartition(".")
    known = [f"{parent}.{k}" if parent else k for k in _keys(getattr(cause, "parent_node", None))]
    close = did_you_mean(leaf, [k.rpartition(".")[2] for k in known])  # the leaf alone: a shared prefix is no match
    if close:
        return f"{full_key} is not a config key{close.replace('mean ', 'mean ' + (parent + '.' if parent else ''))}"
    listed = f"; {parent or 'the top level'} has {', '.join(sorted(known))}" if known else ""
    return f"{full_key} is not a config key{listed}; to add a new key write +{full_key}=<value>"


def error_message(err: BaseException) -> str:
    """One line for a Hydra, OmegaConf or xrayfusion error: the bad value and the fix."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, XrayfusionError):
        return str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option; choose {group}= one of {', '.join(sorted(err.options))}"
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or "a value"
        return f"{key} is required; pass {key}=<value> on the command line"
    unknown = _unknown_key_message(err)
    if unknown:
        return unknown
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))]
    return re.sub(r"\s+", " ", " ".join(lines))[:500]


def handled_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (XrayfusionError, HydraException, OmegaConfBaseException)


def one_line_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a task function (under `@hydra.main`): its errors exit 2 with one line inside the job, before
    Hydra would print its own report."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("XRAYFUSION_FULL_ERROR") == "1":
            return task(*args, **kwargs)
        try:
            return task(*args, **kwargs)
        except handled_errors() as err:
            fail(error_message(err))

    return wrapper


# library messages that tell a user nothing they can act on (each seen on a tiny run of this project)
NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's pytree shim on new torch
    r"The number of training batches .* is smaller than the logging interval",  # tiny data sets
    r".*Add type hints to the `predict` method",  # MLflow pyfunc: the model takes a DataFrame of paths
    r"You defined a `validation_step` but have no `val_dataloader`",
)
NOISE_LOG_LINES = {
    "pytorch_lightning.utilities.rank_zero": ("💡 Tip", "Loading `train_dataloader` to estimate", "TPU available"),
    "lightning_fabric.utilities.seed": ("Seed set to",),
    "mlflow.pyfunc": ("Validating input example against model signature",),
}
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.system_metrics")


def quiet_libraries() -> None:
    """Silence the known library noise of a run (warnings and log lines nobody must act on), once per process."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in NOISE_LOG_LINES.items():
        logging.getLogger(name).addFilter(lambda record, p=prefixes: not record.getMessage().startswith(p))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function; its errors and Hydra's become one short message and exit 2.

    HYDRA_FULL_ERROR=1 set by the user keeps the full traceback.
    """
    quiet_libraries()
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        os.environ["XRAYFUSION_FULL_ERROR"] = "1"
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # make Hydra raise instead of printing, so that we report it
    try:
        main()
    except handled_errors() as err:
        fail(error_message(err))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
