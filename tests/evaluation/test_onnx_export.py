"""The whole ensemble as one ONNX model: outputs equal PyTorch's to 1e-4 under onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.evaluation.test_evaluation import save_checkpoint, tiny_model
from xrayfusion.core.errors import ConfigError
from xrayfusion.evaluation import onnx_export

pytest.importorskip("onnxruntime", reason="pip install onnx onnxscript onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize(
    "fusion", ["average", "stacking-logreg", "stacking-hgb", "concat", "voting", "average-sizes-tta"]
)
def test_exported_ensemble_matches_pytorch(fusion: str, tmp_path: Path) -> None:
    name, _, meta = fusion.removesuffix("-tta").partition("-")
    model = tiny_model(name)
    if meta == "sizes":  # small_cnn at its own 24 px, and test-time flips and scales: all in the exported graph
        switches = {"branch_sizes": {"small_cnn": 24}, "tta": "flips_scales", "tta_scales": [1.25]}
        model, meta = type(model)(**{**model.hparams, **switches}).eval(), ""
        assert model.sizes == [24, 32] and len(model.views) == 4
    if meta:
        model = type(model)(**{**model.hparams, "fusion": {"name": "stacking", "meta": meta}}).eval()
        gen = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (200,), generator=gen)
        model.fusion.fit(torch.rand(200, 2, 2, generator=gen).softmax(2), labels)
    path = onnx_export.export_onnx(model, tmp_path / "model.onnx")
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert onnx_export.onnx_difference(model, path, images) < 1e-4  # a batch size the export never saw
    described = json.loads(Path(f"{path}.json").read_text())
    assert described["input"]["shape"] == ["N", 1, 32, 32] and described["branches"] == ["small_cnn", "darknet"]
    assert len(described["test_time_views"]) == len(model.views)  # 4 with flips_scales, else the plain image
    assert described["thresholds"]["fused"] == pytest.approx(0.4)


@pytest.mark.slow
def test_export_command_writes_and_checks_the_file(cli_in_process, tmp_path: Path) -> None:
    ckpt = save_checkpoint(tiny_model("average"), tmp_path / "best.ckpt")
    result = cli_in_process([f"ckpt_path={ckpt}", "format=onnx", f"output={tmp_path / 'out.onnx'}"], module="export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "onnxruntime vs PyTorch on 4 images: max difference" in result.stdout
    assert (tmp_path / "out.onnx").stat().st_size > 10_000 and (tmp_path / "out.onnx.json").is_file()
    bad = cli_in_process([f"ckpt_path={ckpt}", "format=tflite"], module="export")
    assert bad.returncode == 2 and "format=tflite is not supported" in bad.stderr


@pytest.mark.slow
def test_histogram_equalisation_exports(tmp_path: Path) -> None:
    model = type(tiny_model("average"))(**{**tiny_model("average").hparams, "equalize": "hist"}).eval()
    path = onnx_export.export_onnx(model, tmp_path / "model.onnx")
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert onnx_export.onnx_difference(model, path, images) < 1e-4


def test_clahe_models_are_refused_with_the_setting_named(tmp_path: Path) -> None:
    model = type(tiny_model("average"))(**{**tiny_model("average").hparams, "equalize": "clahe", "clahe_grid": [4, 4]})
    with pytest.raises(ConfigError, match=r"model.equalize=clahe"):
        onnx_export.export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
