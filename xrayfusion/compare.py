"""`python -m xrayfusion.compare`: Markdown table of MLflow runs to stdout, CSV, ROC and bar-chart PNGs."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from xrayfusion.core.cli import CONFIG_DIR, one_line_errors, run
from xrayfusion.core.errors import XrayfusionError

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from xrayfusion import tracking
    from xrayfusion.evaluation import compare as comparison
    from xrayfusion.evaluation.plots import plt

    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    tracking.require_store(uri)  # read-only: never create an empty store
    experiments = OmegaConf.to_container(cfg.experiment) if OmegaConf.is_list(cfg.experiment) else cfg.experiment
    runs = comparison.search_runs(uri, experiments, dict(cfg.tags), cfg.filter, int(cfg.max_runs))
    if not runs:
        tags = {k: v for k, v in cfg.tags.items() if v is not None}
        raise XrayfusionError(
            f"no runs in {uri} match experiment={experiments} tags={tags} filter={cfg.filter}; loosen the selection, "
            "or point MLFLOW_TRACKING_URI (or logger.tracking_uri) at the store your trainings logged to"
        )
    metrics = list(cfg.metrics)
    frame = comparison.comparison_frame(runs, cfg.prefix, metrics, bool(cfg.branches), cfg.sort_by, cfg.ascending)
    print(comparison.markdown_table(frame, metrics))
    ties = comparison.validation_ties(frame)
    if ties:
        print(ties)
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
        if not curves:  # an empty plot would say nothing
            log.warning("no ROC plot: no compared run has %s", comparison.predictions_artifact(cfg.prefix))
        else:
            fig = comparison.roc_figure(curves)
            fig.savefig(cfg.roc_png, dpi=110)
            plt.close(fig)
            log.info("wrote %s (%d runs)", cfg.roc_png, len(curves))


if __name__ == "__main__":
    run(main)
