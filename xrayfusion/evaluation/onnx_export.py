"""The whole ensemble (branches and fusion) as one ONNX model, checked against PyTorch under onnxruntime.

Input `images`: uint8 (N, 1, S, S) grey images at the trained size S, decoded and resized as
`xrayfusion.data.decode` does (grey, bilinear); normalisation (and `model.equalize=hist`) happens inside the
model, as in training. CLAHE (`model.equalize=clahe`) does not export with a dynamic batch and is refused.
Outputs `fused` (N, C) and `branches` (N, K, C) class probabilities; decide with p >= the stored threshold.
A JSON file beside the model documents all of it.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xrayfusion.core.errors import ConfigError
from xrayfusion.core.modes import eval_mode
from xrayfusion.evaluation.loading import trained_thresholds
from xrayfusion.models import FusionClassifier

log = logging.getLogger(__name__)


class ServedEnsemble(nn.Module):
    """uint8 images -> (fused probabilities, branch probabilities): the traced graph of the export."""

    def __init__(self, model: FusionClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["fused_probs"], out["probs"]


def describe(model: FusionClassifier) -> dict[str, Any]:
    """What a user of the ONNX file needs besides the graph: preprocessing, outputs, classes, thresholds."""
    size = int(model.hparams.image_size)
    return {
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["N", 1, size, size],
            "preprocessing": f"read as grey (8-bit, DICOM windowed), resize to {size}x{size} bilinear "
            "(xrayfusion.data.decode.load_grey); normalisation (and histogram equalisation, model.equalize=hist) "
            "is inside the model",
        },
        "outputs": {"fused": ["N", "C"], "branches": ["N", "K", "C"]},
        # inside the graph too: the outputs are already the mean over these views (model.tta)
        "test_time_views": [{"mirrored": v.flip, "scale": v.scale} for v in model.views],
        "branches": list(model.keys),
        "class_names": list(model.hparams.class_names),
        "thresholds": trained_thresholds(model),
        "decision": "binary: positive when the positive-class probability >= threshold; otherwise argmax",
    }


def export_onnx(model: FusionClassifier, path: str | Path) -> Path:
    """Write the ensemble to `path` (ONNX, dynamic batch) and its description to `<path>.json`."""
    try:
        import onnx  # noqa: F401
    except ImportError as err:
        raise ConfigError("format=onnx needs the onnx packages: pip install onnx onnxscript onnxruntime") from err
    if model.hparams.get("autocast") or model.bf16_keys:
        raise ConfigError(
            "this model runs branches under bf16/fp16 autocast, which ONNX export does not reproduce; export a "
            "float32 model (trained without trainer.precision=*-mixed and model.bf16_branches)"
        )
    if model.hparams.get("equalize") == "clahe":
        raise ConfigError(
            "this model equalises its inputs with CLAHE (model.equalize=clahe), whose ONNX graph only runs at the "
            "batch size it was traced with; export a model trained with model.equalize=none or hist, or serve it "
            "with MLflow"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(model.hparams.image_size)
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    wrapper = ServedEnsemble(model).cpu()
    with eval_mode(wrapper), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["fused", "branches"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    Path(f"{path}.json").write_text(json.dumps(describe(model), indent=2))
    return path


def onnx_difference(model: FusionClassifier, path: str | Path, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's probabilities on `images` (uint8)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fused, branches = session.run(None, {"images": images.numpy()})
    with eval_mode(model):
        out = model(images)
    return max(
        float((torch.from_numpy(fused) - out["fused_probs"]).abs().max()),
        float((torch.from_numpy(branches) - out["probs"]).abs().max()),
    )
