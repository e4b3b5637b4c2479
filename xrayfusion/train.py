"""`python -m xrayfusion.train`: train any ensemble, composed by Hydra from conf/."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from xrayfusion.core.cli import CONFIG_DIR, one_line_errors, run


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from xrayfusion.training.run import train  # heavy imports after Hydra parsed the command line

    return train(cfg)


def cli() -> None:
    """The console entry point: `main` with one-line errors (exit 2) instead of tracebacks."""
    run(main)


if __name__ == "__main__":
    cli()
