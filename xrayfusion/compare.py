"""`python -m xrayfusion.compare`: Markdown table of MLflow runs to stdout, CSV, ROC and bar-chart PNGs."""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from xrayfusion.errors import XrayfusionError, exit_on_error

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    from xrayfusion import comparison, tracking
    from xrayfusion.plots import plt

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with exit_on_error():
        uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
        experiments = OmegaConf.to_container(cfg.experiment) if OmegaConf.is_list(cfg.experiment) else cfg.experiment
        runs = comparison.search_runs(uri, experiments, dict(cfg.tags), cfg.filter, int(cfg.max_runs))
        if not runs:
            raise XrayfusionError(f"no runs match experiment={experiments} tags={dict(cfg.tags)} filter={cfg.filter}")
        metrics = list(cfg.metrics)
        frame = comparison.comparison_frame(runs, cfg.prefix, metrics, bool(cfg.branches), cfg.sort_by, cfg.ascending)
        print(comparison.markdown_table(frame, metrics))
        if cfg.csv:
            frame.to_csv(cfg.csv, index=False)
            log.info("wrote %s", cfg.csv)
        if cfg.bar_png:
            fig = comparison.bar_figure(frame, metrics)
            fig.savefig(cfg.bar_png, dpi=110)
            plt.close(fig)
            log.info("wrote %s", cfg.bar_png)
        if cfg.roc_png:
            curves = {}
            for run in runs:
                preds = comparison.load_predictions(uri, run.info.run_id, cfg.prefix)
                if preds is None:
                    log.warning(
                        "run %s has no %s; left out of the ROC plot",
                        run.info.run_id,
                        comparison.predictions_artifact(cfg.prefix),
                    )
                else:
                    curves[f"{run.info.run_name} ({run.info.run_id[:6]})"] = preds
            fig = comparison.roc_figure(curves)
            fig.savefig(cfg.roc_png, dpi=110)
            plt.close(fig)
            log.info("wrote %s (%d runs)", cfg.roc_png, len(curves))


if __name__ == "__main__":
    main()
