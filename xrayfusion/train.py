"""`python -m xrayfusion.train`: train any ensemble, composed by Hydra from conf/."""

from __future__ import annotations

import logging
import os

import hydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from xrayfusion.errors import exit_on_error, fail

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from xrayfusion.training import train  # heavy imports after Hydra parsed the command line

    with exit_on_error():
        return train(cfg)


def hydra_error_message(err: BaseException) -> str:
    """Hydra's multi-line composition error as one line naming the bad override and the choices."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option; choose {group}= one of {', '.join(sorted(err.options))}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))]
    return " ".join(lines)[:500]


def cli() -> None:
    """Run `main`; Hydra's own errors (unknown group option, bad override syntax) become one short message.

    HYDRA_FULL_ERROR=1 set by the user keeps Hydra's full traceback.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # make Hydra raise instead of printing, so that we report it
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        fail(hydra_error_message(err))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    cli()
