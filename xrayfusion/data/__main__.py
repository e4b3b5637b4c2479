"""`python -m xrayfusion.data data=...`: print the dataset report (no training)."""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig, OmegaConf

from xrayfusion.core.cli import CONFIG_DIR, one_line_errors, run


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from xrayfusion.data import build_source
    from xrayfusion.data.report import dataset_report

    started = time.perf_counter()
    source = build_source(OmegaConf.to_container(cfg.data, resolve=True))
    seconds = time.perf_counter() - started
    where = cfg.data.get("root") or cfg.data.get("path") or "in memory"
    print(f"data={cfg.data.name} ({where}), loaded in {seconds:.1f} s")
    print(dataset_report(source))


if __name__ == "__main__":
    run(main)
