"""`python -m xrayfusion.search`: an Optuna search over any train config; the same command again resumes it."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from xrayfusion.core.cli import CONFIG_DIR, one_line_errors, run


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="search")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from xrayfusion.training.search import search  # heavy imports after Hydra parsed the command line

    return search(cfg, list(HydraConfig.get().overrides.task))


def cli() -> None:
    """The console entry point: `main` with one-line errors (exit 2) instead of tracebacks."""
    run(main)


if __name__ == "__main__":
    cli()
