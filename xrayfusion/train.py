"""`python -m xrayfusion.train`: train any ensemble, composed by Hydra from conf/."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from xrayfusion.errors import XrayfusionError

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from xrayfusion.training import train  # heavy imports after Hydra parsed the command line

    try:
        return train(cfg)
    except XrayfusionError as err:
        print(f"xrayfusion: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
