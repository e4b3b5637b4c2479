"""Cross-fitting and the leakage guard: fits only ever see predictions of images the branches did not train on."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score

from tests.conftest import REPO
from xrayfusion import tracking
from xrayfusion.core.errors import ConfigError
from xrayfusion.data import XRayDataModule
from xrayfusion.fusion import crossfit
from xrayfusion.fusion.strategies import build_fusion
from xrayfusion.training import folds
from xrayfusion.training.factory import build_model, build_trainer


def memoriser(features: np.ndarray, labels: np.ndarray):
    """A 'branch' that memorises its training labels exactly and guesses 0.5 for images it never saw."""

    def fit_predict(train_idx: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        seen = {int(i): int(labels[i]) for i in train_idx}
        p1 = torch.tensor([0.98 if seen.get(int(i)) == 1 else 0.02 if int(i) in seen else 0.5 for i in idx])
        p1 = p1 + 0.01 * torch.from_numpy(features[idx])  # a feature unrelated to the (random) labels
        return torch.stack([1 - p1, p1], dim=1)

    return fit_predict


@pytest.mark.parametrize("fusion_cfg", [{"name": "stacking"}, {"name": "average", "weights": "learned"}])
def test_memorising_branches_give_chance_out_of_fold(fusion_cfg: dict) -> None:
    rng = np.random.default_rng(0)
    n = 240
    labels = rng.integers(0, 2, n)  # random labels: nothing to learn
    groups = [f"p{i // 2}" for i in range(n)]  # two images per patient
    branches = [memoriser(rng.random(n), labels) for _ in range(2)]
    seen_by_fit: list[tuple[np.ndarray, np.ndarray]] = []

    def fit_predict(fold: int, train_idx: np.ndarray, held_idx: np.ndarray) -> torch.Tensor:
        seen_by_fit.append((train_idx, held_idx))
        return torch.stack([b(train_idx, held_idx) for b in branches], dim=1)

    oof, fold_of = crossfit.cross_fit(labels, groups, 3, 0, fit_predict)
    in_sample = torch.stack([b(np.arange(n), np.arange(n)) for b in branches], dim=1)
    assert roc_auc_score(labels, in_sample[:, 0, 1]) == 1.0  # what a leaky fit would see
    for k in range(2):
        assert 0.35 < roc_auc_score(labels, oof[:, k, 1]) < 0.65
    assert sorted(set(fold_of.tolist())) == [0, 1, 2]
    for train_idx, held_idx in seen_by_fit:
        assert not {groups[i] for i in train_idx} & {groups[i] for i in held_idx}

    fusion = build_fusion(fusion_cfg, 2, 2, [1, 1])
    fusion.fit(oof, torch.from_numpy(labels))
    fused, _ = fusion(oof, [])
    assert 0.35 < roc_auc_score(labels, fused[:, 1]) < 0.65
    # a fit on in-sample predictions would be confidently wrong about unseen images; the OOF fit is not
    assert float(fused[:, 1].sub(0.5).abs().max()) < 0.2


def test_cross_fit_refuses_overlapping_folds(monkeypatch) -> None:
    monkeypatch.setattr(
        crossfit, "grouped_folds", lambda *a: [(np.array([0, 1]), np.array([1, 2])), (np.array([2]), np.array([0]))]
    )
    with pytest.raises(RuntimeError, match="share"):
        crossfit.cross_fit([0, 1, 0], ["a", "b", "c"], 2, 0, lambda *a: torch.zeros(2, 1, 2))


@pytest.mark.slow
def test_folds_train_with_the_final_recipe_and_never_on_their_held_out_fold(tmp_path, monkeypatch) -> None:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "model.branches=[small_cnn,small_cnn]",
                "fusion=stacking",
                "fusion.cv=2",
                "data=synthetic",
                "data.n_train=32",
                "data.n_val=16",
                "data.n_test=8",
                "data.image_size=32",
                "data.batch_size=16",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "model.trainable_layers=0",
                f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                f"paths.mlruns_dir={tmp_path}/mlruns",
                f"paths.output_dir={tmp_path}/out",
            ],
            return_hydra_config=False,
        )
    dm = XRayDataModule(dict(cfg.data))
    train = dm.prepare().train
    parent = tracking.create_logger(cfg.logger, "parent", {})
    trained_on: list[set[str]] = []

    fold_callbacks: list[list[str]] = []

    def recording_build_model(cfg, fold_dm, **kwargs):
        trained_on.append(set(fold_dm.prepare().train.names))
        assert fold_dm.prepare().test is None
        return build_model(cfg, fold_dm, **kwargs)

    def recording_build_trainer(*args, **kwargs):
        parts = build_trainer(*args, **kwargs)
        fold_callbacks.append(sorted(type(c).__name__ for c in parts.trainer.callbacks))
        return parts

    monkeypatch.setattr(folds, "build_model", recording_build_model)
    monkeypatch.setattr(folds, "build_trainer", recording_build_trainer)
    fit_predict = folds.fold_fit_predict(cfg, dm, parent, tmp_path, 2, calibrate=True, bf16_branches=[])
    oof, fold_of = crossfit.cross_fit(train.labels.tolist(), train.groups, 2, int(cfg.seed), fit_predict)
    assert oof.shape == (32, 2, 2) and len(trained_on) == 2
    # a fold is built by the same factory as the final model: the freeze callback and the loss guard included
    final = build_trainer(cfg, build_model(cfg, dm), False, tmp_path / "f", tmp_path / "f", enable_model_summary=False)
    expected = sorted(type(c).__name__ for c in final.trainer.callbacks)
    assert {"BackboneFreeze", "FiniteLossGuard", "ModelCheckpoint"} <= set(expected)
    assert fold_callbacks == [expected, expected]
    for fold, names in enumerate(trained_on):
        held = {train.names[i] for i in np.flatnonzero(fold_of == fold)}
        assert held and not names & held and names | held == set(train.names)
    runs = parent.experiment.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert len(runs) == 2 and all("calibration/temperature_small_cnn" in r.data.params for r in runs)


def test_auto_cv_fits_out_of_fold_only_when_validation_is_saturated() -> None:
    folds_when_saturated, why = crossfit.choose_cv({"a": 0.9991, "b": 0.97}, 0.995, 5)
    assert folds_when_saturated == 5 and "best branch a val AUROC 0.9991 >= 0.995" in why
    assert crossfit.choose_cv({"a": 0.99, "b": 0.97}, 0.995, 5) == (
        None,
        "validation informative: best branch a val AUROC 0.9900 < 0.995",
    )
    assert crossfit.choose_cv({"a": 1.0}, 0.995, 0)[0] == 0  # folds=0: no fit, equal weights
    assert crossfit.choose_cv({"a": float("nan")}, 0.995, 5)[0] is None  # one class: nothing says saturated
    assert crossfit.parse_cv("auto") == crossfit.AUTO and crossfit.parse_cv(" holdout ") is None
    assert crossfit.auto_settings(None) == (0.995, 5)
    for bad, match in (
        ({"saturated_at": 0.3}, "saturated_at=0.3"),
        ({"folds": 1}, "folds=1"),
        ({"folds": "x"}, "x"),
        (0.99, "must be a mapping"),
        ({"saturated_at": True}, "takes numbers"),
    ):
        with pytest.raises(ConfigError, match=match):
            crossfit.auto_settings(bad)
