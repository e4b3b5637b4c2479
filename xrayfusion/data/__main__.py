"""`python -m xrayfusion.data data=...`: print the dataset report (no training)."""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from xrayfusion.errors import XrayfusionError


@hydra.main(version_base="1.3", config_path="../../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    from xrayfusion.data.report import dataset_report
    from xrayfusion.data.sources import build_source

    try:
        started = time.perf_counter()
        source = build_source(OmegaConf.to_container(cfg.data, resolve=True))
        seconds = time.perf_counter() - started
    except XrayfusionError as err:
        print(f"xrayfusion: error: {err}", file=sys.stderr)
        sys.exit(2)
    where = cfg.data.get("root") or cfg.data.get("path") or "in memory"
    print(f"data={cfg.data.name} ({where}), loaded in {seconds:.1f} s")
    print(dataset_report(source))


if __name__ == "__main__":
    main()
