"""`python -m xrayfusion.predict run_id=<id> inputs=<file|folder|glob> output=preds.csv`."""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from xrayfusion.errors import exit_on_error

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from xrayfusion import evaluation, prediction, tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with exit_on_error():
        uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri")) if cfg.run_id else None
        model = evaluation.resolve_classifier(cfg.run_id, cfg.ckpt_path, uri, cfg.device)
        paths = prediction.expand_inputs(str(cfg.inputs))
        frame = prediction.predict_files(model, paths, int(cfg.batch_size))
        frame.to_csv(cfg.output, index=False)
        failed = int(frame["error"].notna().sum())
        log.info("wrote %s: %d images, %d unreadable", cfg.output, len(frame), failed)


if __name__ == "__main__":
    main()
