"""`python -m xrayfusion.predict run_id=<id> inputs=<file|folder|glob> output=preds.csv`."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from xrayfusion.core.cli import CONFIG_DIR, one_line_errors, run

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from xrayfusion import tracking
    from xrayfusion.evaluation import loading, predict

    paths = predict.expand_inputs(str(cfg.inputs))  # a missing `inputs` fails before the model is loaded
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri")) if cfg.run_id else None
    run_id = tracking.resolve_run_id(uri, str(cfg.run_id)) if cfg.run_id else None  # a unique prefix is enough
    model = loading.resolve_classifier(run_id, cfg.ckpt_path, uri, cfg.device)
    frame = predict.predict_files(model, paths, int(cfg.batch_size))
    frame.to_csv(cfg.output, index=False)
    failed = int(frame["error"].notna().sum())
    log.info("wrote %s: %d images, %d unreadable", cfg.output, len(frame), failed)


if __name__ == "__main__":
    run(main)
