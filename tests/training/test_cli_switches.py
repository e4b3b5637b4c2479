"""Issue 16's training switches end to end: EMA of the weights, Mixup/CutMix with label smoothing and CLAHE in one
tiny ensemble run, and the branch-diversity metrics every ensemble run logs (read back, and shown by compare)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import SMALL_SYNTHETIC
from xrayfusion.evaluation.diversity import branch_diversity
from xrayfusion.evaluation.evaluate import evaluate_model
from xrayfusion.evaluation.loading import load_classifier, trained_thresholds

SWITCHES = [
    "model.ema.enabled=true",
    "model.ema.decay=0.5",
    "model.mixup.mixup_alpha=0.4",
    "model.mixup.cutmix_alpha=1.0",
    "model.mixup.label_smoothing=0.1",
    "model.equalize=clahe",
    "model.clahe.grid=[4,4]",
]


@pytest.mark.slow
def test_ema_mixup_clahe_run_validates_what_it_saves_and_logs_branch_diversity(
    train_task, cli_in_process, tracking_uri: str, tmp_path: Path
) -> None:
    train_task([*SMALL_SYNTHETIC, "model=ensemble", "model.branches=[small_cnn,darknet]", *SWITCHES])
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    logged = run.data.metrics
    out = tmp_path / "outputs/run"
    model = load_classifier(out / "checkpoints/best.ckpt")
    assert model.hparams.equalize == "clahe" and model.hparams.clahe_grid == [4, 4]  # served as it was tested
    assert model.hparams.mixup["cutmix_alpha"] == 1.0

    # EMA: the weights saved (and tested) are the weights validated during training: evaluate split=val on the
    # final checkpoint gives exactly the validation metrics the run logged
    data_cfg = OmegaConf.to_container(OmegaConf.load(out / "config.yaml").data, resolve=True)
    results, _, _ = evaluate_model(model, data_cfg, "val", n_bootstrap=0)
    auroc = results[results["metric"] == "auroc"].set_index("model")["value"]
    for name in ("small_cnn", "darknet", "fused"):
        assert auroc[name] == pytest.approx(logged[f"val/{name}/auroc"], abs=1e-6), name

    # diversity: on validation and test, per pair and the mean over pairs, as MLflow metrics
    for prefix in ("val", "test"):
        pair = logged[f"{prefix}/diversity/small_cnn__darknet/disagreement"]
        assert 0 <= pair <= 1 and logged[f"{prefix}/diversity/mean_disagreement"] == pair
    with tempfile.TemporaryDirectory() as tmp:
        frame = pd.read_csv(client.download_artifacts(run.info.run_id, "test_predictions.csv", tmp))
    probs = torch.stack(
        [torch.tensor(frame[[f"{k}/normal", f"{k}/pneumonia"]].to_numpy()) for k in ("small_cnn", "darknet")], dim=1
    )
    thresholds = trained_thresholds(model)  # the stored ones (the logged params are rounded to 6 digits)
    labels = torch.tensor(frame["label"].to_numpy())
    again = branch_diversity(labels, probs.float(), ["small_cnn", "darknet"], thresholds)
    assert again["mean_disagreement"] == pytest.approx(logged["test/diversity/mean_disagreement"], abs=1e-9)

    # compare shows the ensemble's mean diversity beside its metrics (and takes `diversity` for no model)
    result = cli_in_process(["branches=true", "csv=null", "roc_png=null", "bar_png=null"], module="compare")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean_disagreement" in result.stdout and "mean_error_corr" in result.stdout
    assert f"{logged['test/diversity/mean_disagreement']:.3f}" in result.stdout
    assert not re.search(r"\|\s*diversity\s*\|", result.stdout)
    # no run has validation predictions to plot: no empty ROC plot, one warning line saying why
    result = cli_in_process(["prefix=val", "csv=null", "roc_png=val_roc.png", "bar_png=null"], module="compare")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no ROC plot: no compared run has val/predictions.csv" in result.stdout + result.stderr
    assert not Path("val_roc.png").exists()


@pytest.mark.slow
def test_tta_each_epoch_false_validates_epochs_on_the_image_alone_and_serves_the_views(
    train_task, tracking_uri: str, tmp_path: Path
) -> None:
    from xrayfusion.models import FusionClassifier

    args = ["model=ensemble", "model.branches=[small_cnn,darknet]", "fusion=average", "model.tta=flips"]
    train_task([*SMALL_SYNTHETIC, *args, "model.tta_each_epoch=false"])
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    logged, out = run.data.metrics, tmp_path / "outputs/run"
    model = load_classifier(out / "checkpoints/best.ckpt")
    assert model.hparams.tta == "flips" and len(model.views) == 2 and model.hparams.tta_each_epoch is False
    data_cfg = OmegaConf.to_container(OmegaConf.load(out / "config.yaml").data, resolve=True)

    # the epoch's validation (the best-epoch choice, the val/ metrics): the image alone
    plain = FusionClassifier(**{**model.hparams, "tta": "none", "load_weights": False}).eval()
    plain.load_state_dict(model.state_dict())
    plain_results, plain_frame, _ = evaluate_model(plain, data_cfg, "val", n_bootstrap=0)
    plain_values = plain_results.set_index(["model", "metric"])["value"]
    for name in ("small_cnn", "darknet", "fused"):
        for metric in ("auroc", "ece"):  # the calibration error moves with any probability
            assert plain_values[name, metric] == pytest.approx(logged[f"val/{name}/{metric}"], abs=1e-6), name
    # everything after training averages the views: the fused validation score the run ranks on, and the served model
    results, frame, _ = evaluate_model(model, data_cfg, "val", n_bootstrap=0)
    values = results.set_index(["model", "metric"])["value"]
    assert values["fused", "auroc"] == pytest.approx(logged["fusion/val_auroc"], abs=1e-6)
    assert values["fused", "ece"] != pytest.approx(logged["val/fused/ece"], abs=1e-6)
    column = [c for c in frame.columns if c.startswith("fused/")][-1]
    assert not frame[column].equals(plain_frame[column])  # the views do change the probabilities
