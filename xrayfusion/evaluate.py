"""`python -m xrayfusion.evaluate run_id=<id>`: every branch and the fused model, with bootstrap intervals."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from xrayfusion.core.cli import CONFIG_DIR, one_line_errors, run

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from xrayfusion import tracking
    from xrayfusion.evaluation import evaluate, loading, metrics

    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    run_id = tracking.resolve_run_id(uri, str(cfg.run_id)) if cfg.run_id else None  # a unique prefix is enough
    model = loading.resolve_classifier(run_id, cfg.ckpt_path, uri, cfg.device)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    evaluation = evaluate.evaluate_model(
        model,
        data_cfg,
        cfg.split,
        int(cfg.metrics.bootstrap),
        int(cfg.seed),
        cfg.metrics.threshold,
        int(cfg.batch_size),
    )
    prefix = f"eval/{cfg.name}" if cfg.split == "test" else f"eval/{cfg.name}_{cfg.split}"
    n_images = len(evaluation.predictions)
    print(f"{prefix} ({n_images} images, 95% bootstrap intervals over {cfg.metrics.bootstrap} resamples)")
    print(metrics.results_table(evaluation.results).to_markdown(index=False))
    if evaluation.diversity:  # ensembles: how differently the branches decide at their thresholds
        d = evaluation.diversity
        print(
            f"branch diversity: mean disagreement {d['mean_disagreement']:.3f}, "
            f"mean error correlation {d['mean_error_corr']:.3f}"
        )
    if cfg.log and run_id:
        evaluate.log_evaluation(uri, run_id, prefix, evaluation)
        log.info("logged %s/... into run %s", prefix, run_id)
    elif cfg.log:
        log.info("ckpt_path has no run to log into; printed only")


if __name__ == "__main__":
    run(main)
