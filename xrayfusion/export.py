"""`python -m xrayfusion.export run_id=<id> format=onnx output=model.onnx`: the whole ensemble as one ONNX file."""

from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig

from xrayfusion.core.cli import CONFIG_DIR, one_line_errors, run
from xrayfusion.core.errors import ConfigError

log = logging.getLogger("xrayfusion")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from xrayfusion import tracking
    from xrayfusion.evaluation import loading, onnx_export

    if cfg.format != "onnx":
        raise ConfigError(f"format={cfg.format} is not supported; use format=onnx")
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri")) if cfg.run_id else None
    run_id = tracking.resolve_run_id(uri, str(cfg.run_id)) if cfg.run_id else None
    model = loading.resolve_classifier(run_id, cfg.ckpt_path, uri, "cpu")
    path = onnx_export.export_onnx(model, cfg.output)
    size = int(model.hparams.image_size)
    check = torch.randint(0, 256, (4, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gap = onnx_export.onnx_difference(model, path, check)
    print(f"wrote {path} and {path}.json; onnxruntime vs PyTorch on 4 images: max difference {gap:.1e}")
    if gap > 1e-4:
        raise ConfigError(f"the exported model differs from PyTorch by {gap:.1e} (> 1e-4); please report it")


if __name__ == "__main__":
    run(main)
