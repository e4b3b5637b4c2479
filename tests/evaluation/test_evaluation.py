"""Evaluation library: metrics against scikit-learn, seeded bootstrap intervals, checkpoint round trip, predict."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from sklearn import metrics as skm

from tests.conftest import write_image
from xrayfusion.core.errors import ConfigError, DataError
from xrayfusion.evaluation import loading, metrics
from xrayfusion.evaluation import predict as prediction
from xrayfusion.evaluation.diversity import branch_diversity
from xrayfusion.evaluation.evaluate import evaluate_model
from xrayfusion.evaluation.inference import predict
from xrayfusion.models import FusionClassifier


def tiny_model(fusion: str = "stacking", size: int = 32) -> FusionClassifier:
    torch.manual_seed(0)
    return FusionClassifier(
        branches=["small_cnn", "darknet"],
        num_classes=2,
        fusion={"name": fusion},
        image_size=size,
        class_names=["normal", "pneumonia"],
        threshold=0.4,
    ).eval()


def save_checkpoint(model: FusionClassifier, path: Path) -> Path:
    """What Trainer.save_checkpoint(weights_only=True) writes: weights plus the saved hparams."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


def random_predictions(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    p1 = (0.35 * labels + 0.65 * torch.rand(n, generator=gen)).clamp(0, 1)
    return labels, torch.stack([1 - p1, p1], dim=1)


def test_binary_metrics_agree_with_scikit_learn() -> None:
    labels, probs = random_predictions()
    got = metrics.compute_metrics(labels, probs, threshold=0.4)
    y, p = labels.numpy(), probs[:, 1].numpy()
    pred = (p >= 0.4).astype(int)
    assert got["acc"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert got["precision"] == pytest.approx(skm.precision_score(y, pred), abs=1e-6)
    assert got["recall"] == pytest.approx(skm.recall_score(y, pred), abs=1e-6)
    assert got["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0), abs=1e-6)
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-6)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert got["ap"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-6)
    bins = np.minimum((p * 15).astype(int), 14)  # 15 equal bins of the positive-class confidence, as torchmetrics
    ece = sum(
        abs(p[bins == b].mean() - y[bins == b].mean()) * (bins == b).mean() for b in range(15) if (bins == b).any()
    )
    assert got["ece"] == pytest.approx(ece, abs=1e-5)


def test_multiclass_metrics_are_macro_averaged() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(90) % 3
    probs = torch.softmax(torch.randn(90, 3, generator=gen) + 2 * torch.nn.functional.one_hot(labels, 3), dim=1)
    got = metrics.compute_metrics(labels, probs)
    y, pred = labels.numpy(), probs.argmax(1).numpy()
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-6)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, probs.numpy(), multi_class="ovr"), abs=1e-6)


def test_ranking_metrics_are_nan_with_one_class() -> None:
    labels = torch.ones(10, dtype=torch.long)
    got = metrics.compute_metrics(labels, torch.tensor([[0.3, 0.7]]).repeat(10, 1))
    assert math.isnan(got["auroc"]) and math.isnan(got["ap"]) and got["recall"] == 1.0


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    labels, probs = random_predictions(200)
    a = metrics.bootstrap_intervals(labels, probs, 0.5, 200, seed=3)
    b = metrics.bootstrap_intervals(labels, probs, 0.5, 200, seed=3)
    c = metrics.bootstrap_intervals(labels, probs, 0.5, 200, seed=4)
    assert a == b and a != c
    point = metrics.compute_metrics(labels, probs)
    for name in metrics.EVAL_METRICS:
        lo, hi = a[name]
        assert lo <= hi
        if name != "ece":  # ece is biased upwards under resampling
            assert lo <= point[name] <= hi
    small = metrics.bootstrap_intervals(labels[:40], probs[:40], 0.5, 200, seed=3)
    assert small["auroc"][1] - small["auroc"][0] > a["auroc"][1] - a["auroc"][0]


def test_evaluate_predictions_rows_metrics_and_table() -> None:
    labels, probs = random_predictions(60)
    results = metrics.evaluate_predictions(labels, {"a": probs, "fused": probs.flip(1)}, 0.5, n_bootstrap=0)
    assert len(results) == 2 * len(metrics.EVAL_METRICS) and results["ci_low"].isna().all()
    logged = metrics.mlflow_metrics(results, "eval/synthetic")
    assert "eval/synthetic/fused/auroc" in logged and not any(k.endswith("_ci_low") for k in logged)
    with_ci = metrics.evaluate_predictions(labels, {"fused": probs}, 0.5, n_bootstrap=50, seed=0)
    logged = metrics.mlflow_metrics(with_ci, "test")
    assert logged["test/fused/auroc_ci_low"] <= logged["test/fused/auroc"] <= logged["test/fused/auroc_ci_high"]
    table = metrics.results_table(with_ci)
    assert list(table["model"]) == ["fused"] and " [" in table.loc[0, "auroc"]
    with pytest.raises(DataError):
        metrics.evaluate_predictions(labels[:0], {"fused": probs[:0]})


def test_predictions_frame_round_trip() -> None:
    labels, probs = random_predictions(5)
    frame = metrics.predictions_frame([f"img{i}" for i in range(5)], labels, {"fused": probs}, ["n", "p"])
    assert list(frame.columns) == ["name", "label", "fused/n", "fused/p"]
    np.testing.assert_allclose(metrics.probs_from_frame(frame), probs.numpy(), rtol=1e-6)
    with pytest.raises(DataError):
        metrics.probs_from_frame(frame, "resnet18")


def test_checkpoint_round_trip_keeps_fitted_fusion_and_threshold(tmp_path: Path) -> None:
    model = tiny_model("stacking")
    x = torch.randint(0, 255, (6, 1, 32, 32), dtype=torch.uint8)
    branch_probs = model(x)["probs"].detach()
    model.fusion.fit(branch_probs, torch.tensor([0, 1, 0, 1, 0, 1]))
    expected = predict(model, x).by_model()
    loaded = loading.load_classifier(save_checkpoint(model, tmp_path / "best.ckpt"))
    got = predict(loaded, x).by_model()
    assert bool(loaded.fusion.fitted) and loaded.hparams.threshold == 0.4
    for key in ("small_cnn", "darknet", "fused"):
        torch.testing.assert_close(got[key], expected[key])
    with pytest.raises(ConfigError, match="ckpt_path"):
        loading.load_classifier(tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="exactly one"):
        loading.resolve_classifier(None, None, None)


def test_evaluate_model_on_a_data_config_uses_the_trained_size() -> None:
    model = tiny_model("average", size=32)
    data = {
        "name": "synthetic",
        "image_size": 64,
        "n_train": 8,
        "n_val": 8,
        "n_test": 20,
        "augment": {"enabled": False},
    }
    results, preds, diversity = evaluate_model(model, data, n_bootstrap=20)
    assert len(preds) == 20 and set(results["model"]) == {"small_cnn", "darknet", "fused"}
    # the branches' diversity at the thresholds the rows were scored at, from the same predictions
    decide = loading.trained_thresholds(model)
    branch_probs = torch.stack(
        [torch.tensor(preds[[f"{k}/{c}" for c in model.hparams.class_names]].to_numpy()) for k in model.keys], dim=1
    )
    expected = branch_diversity(torch.tensor(preds["label"].to_numpy()), branch_probs, model.keys, decide)
    assert diversity == pytest.approx(expected) and "small_cnn__darknet/disagreement" in diversity
    with pytest.raises(DataError, match="classes"):
        evaluate_model(model, {**data, "num_classes": 3}, n_bootstrap=0)
    with pytest.raises(ConfigError, match="split"):
        evaluate_model(model, data, split="holdout")


def test_predict_files_reports_unreadable_inputs(tmp_path: Path) -> None:
    model = tiny_model("average")
    good = [write_image(tmp_path / "in" / f"{i}.png", i % 2, size=50, mode="RGB", seed=i) for i in range(3)]
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    paths = prediction.expand_inputs(str(tmp_path / "in"))
    assert len(paths) == 4
    frame = prediction.predict_files(model, [*paths, str(tmp_path / "gone.png")])
    assert list(frame.columns) == prediction.output_columns(model)
    ok = frame[frame["error"].isna()]
    assert len(ok) == 3 and set(ok["predicted_class"]) <= {"normal", "pneumonia"}
    np.testing.assert_allclose(ok["fused_prob_normal"] + ok["fused_prob_pneumonia"], 1.0, rtol=1e-5)
    errors = frame.set_index("path")["error"]
    assert "cannot decode" in errors[str(tmp_path / "in" / "broken.png")]
    assert errors[str(tmp_path / "gone.png")] == "file not found"
    assert prediction.expand_inputs(str(tmp_path / "in" / "*.png")) == paths
    assert prediction.expand_inputs(str(good[0])) == [str(good[0])]
    with pytest.raises(ConfigError, match="matched no image"):
        prediction.expand_inputs(str(tmp_path / "in" / "*.jpeg"))
    assert isinstance(frame, pd.DataFrame)


def test_each_branch_keeps_its_own_validation_threshold_through_the_checkpoint(tmp_path: Path) -> None:
    model = tiny_model("average")
    model.hparams.branch_thresholds = {"small_cnn": 0.3, "darknet": 0.7}
    loaded = loading.load_classifier(save_checkpoint(model, tmp_path / "best.ckpt"))
    assert loading.trained_thresholds(loaded) == {"small_cnn": 0.3, "darknet": 0.7, "fused": 0.4}
    assert loading.trained_thresholds(loaded, 0.5) == {"small_cnn": 0.5, "darknet": 0.5, "fused": 0.5}
    # checkpoints written before per-branch thresholds were saved fall back to the fused threshold
    assert loading.trained_thresholds(tiny_model("average")) == {"small_cnn": 0.4, "darknet": 0.4, "fused": 0.4}


def _model_of_run(kermany_root: Path, seed: int) -> tuple[FusionClassifier, list[str]]:
    """A model that records the split of a training with data.seed=`seed` (as build_model stores it)."""
    from xrayfusion.data import XRayDataModule

    cfg = {"name": "kermany", "root": str(kermany_root), "image_size": 32, "val_fraction": 0.25, "seed": seed}
    val = XRayDataModule(cfg).prepare().val
    model = tiny_model("average")
    model.hparams.data_split = {"seed": seed, "val_fraction": 0.25, "val_digest": val.digest()}
    model.hparams.class_names = ["NORMAL", "PNEUMONIA"]
    return model, sorted(val.names)


def test_evaluate_split_val_scores_the_runs_own_validation_images(kermany_root: Path, tmp_path: Path) -> None:
    model, run_val = _model_of_run(kermany_root, seed=7)
    data = {"name": "kermany", "root": str(kermany_root), "val_fraction": 0.15, "seed": 42, "cache_dir": None}
    # evaluate's own seed and fraction differ from the run's
    preds = evaluate_model(model, data, split="val", n_bootstrap=0).predictions
    assert sorted(preds["name"]) == run_val
    train = evaluate_model(model, data, split="train", n_bootstrap=0).predictions
    assert set(train["name"]).isdisjoint(run_val)
    other = tmp_path / "other"
    shutil.copytree(kermany_root, other)
    (other / "train" / run_val[0]).unlink()  # another data set: another validation split
    with pytest.raises(DataError, match="does not give this run's validation split"):
        evaluate_model(model, {**data, "root": str(other)}, split="val", n_bootstrap=0)
    model.hparams.data_split = None  # a checkpoint that never recorded its split
    with pytest.raises(DataError, match="does not record"):
        evaluate_model(model, data, split="val", n_bootstrap=0)


def test_evaluate_threshold_rules_are_chosen_on_the_runs_validation_split(kermany_root: Path) -> None:
    model, _ = _model_of_run(kermany_root, seed=7)
    data = {"name": "kermany", "root": str(kermany_root), "val_fraction": 0.25, "seed": 42, "cache_dir": None}
    for rule in ("youden", "sensitivity@0.9", 0.3):
        results = evaluate_model(model, data, split="test", n_bootstrap=0, threshold=rule).results
        assert set(results["model"]) == {"small_cnn", "darknet", "fused"}
    with pytest.raises(ConfigError, match="metrics.threshold='median'"):
        evaluate_model(model, data, split="test", n_bootstrap=0, threshold="median")


@pytest.mark.parametrize("ties", [None, 15, 50])
def test_all_resamples_at_once_equal_compute_metrics_on_each(ties: int | None) -> None:
    labels, probs = random_predictions(n=150, seed=2)
    if ties:  # scores on bin edges and shared by many images
        p1 = torch.round(probs[:, 1] * ties) / ties
        probs = torch.stack([1 - p1, p1], dim=1)
    idx = np.random.default_rng(0).integers(0, 150, size=(25, 150))
    counts = np.zeros_like(idx)
    np.add.at(counts, (np.arange(25)[:, None], idx), 1)
    for threshold in (0.5, float(probs[7, 1])):  # a threshold equal to some scores
        fast = metrics.resampled_binary_metrics(labels, probs, threshold, counts)
        for b, row in enumerate(idx):
            one = metrics.compute_metrics(labels[torch.from_numpy(row)], probs[torch.from_numpy(row)], threshold)
            for name, value in one.items():
                assert fast[name][b] == pytest.approx(value, abs=1e-6), (b, name)


def test_patients_are_resampled_whole_and_images_as_before() -> None:
    rng = np.random.default_rng(3)  # the image bootstrap's draws are what they were before groups existed
    before = np.zeros((50, 30), dtype=np.int64)
    np.add.at(before, (np.arange(50)[:, None], rng.integers(0, 30, size=(50, 30))), 1)
    assert np.array_equal(metrics.resample_counts(30, 50, seed=3), before)
    groups = [f"p{i // 3}" for i in range(30)]  # 10 patients, 3 images each
    counts = metrics.resample_counts(30, 50, seed=3, groups=groups)
    assert counts.shape == (50, 30) and (counts.sum(axis=1) == 30).all()  # 10 patients drawn, 3 images each
    for i in range(0, 30, 3):
        assert (counts[:, i] == counts[:, i + 1]).all() and (counts[:, i] == counts[:, i + 2]).all()
    labels, probs = random_predictions(30, seed=1)
    grouped = metrics.bootstrap_intervals(labels, probs, 0.5, 200, seed=3, groups=groups)
    assert grouped != metrics.bootstrap_intervals(labels, probs, 0.5, 200, seed=3)


def test_paired_difference_interval_scores_both_models_on_the_same_resamples() -> None:
    labels, good = random_predictions(120, seed=4)
    groups = [f"p{i // 2}" for i in range(120)]
    assert metrics.paired_difference_interval(labels, good, good, "auroc", 200, seed=5, groups=groups) == (0.0, 0.0)
    # the same model plus a little noise: correlated predictions, so the paired interval of the difference is far
    # narrower than the models' own intervals
    noisy = good + 0.05 * torch.randn(good.shape, generator=torch.Generator().manual_seed(0))
    noisy = (noisy.clamp(1e-4, 1) / noisy.clamp(1e-4, 1).sum(1, keepdim=True)).float()
    low, high = metrics.paired_difference_interval(labels, good, noisy, "auroc", 500, seed=5, groups=groups)
    own_a = metrics.bootstrap_intervals(labels, good, 0.5, 500, seed=5, groups=groups)["auroc"]
    assert high - low < (own_a[1] - own_a[0]) / 2
    # by hand: each resample's AUROC of a minus that of b, the same resamples for both
    counts = metrics.resample_counts(120, 500, seed=5, groups=groups)
    diff = (
        metrics.resampled_binary_metrics(labels, good, 0.5, counts)["auroc"]
        - metrics.resampled_binary_metrics(labels, noisy, 0.5, counts)["auroc"]
    )
    assert (low, high) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])))
    # a model against its reverse: clearly better, the whole interval above 0
    reverse = good.flip(1)
    assert metrics.paired_difference_interval(labels, good, reverse, "auroc", 200, seed=5, groups=groups)[0] > 0
