"""model.feature_cache: frozen branches compute their pooled features once, with the same numbers as without."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torchvision.transforms import v2

from tests.conftest import SMALL_SYNTHETIC
from xrayfusion.core.errors import ConfigError
from xrayfusion.data import ImageSet
from xrayfusion.evaluation.evaluate import evaluate_model
from xrayfusion.evaluation.loading import load_classifier
from xrayfusion.models import FusionClassifier
from xrayfusion.models.feature_cache import FeatureStore, build_store


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in ImageNet weights file for efficientnet_lite0 (random values, the real layout)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), folder / "efficientnet_lite0_test.pth")
    torch.save(timm.create_model("efficientnet_lite1").state_dict(), folder / "efficientnet_lite1_test.pth")
    return folder


def frozen_run(weights_dir: Path, *extra: str) -> list[str]:
    return [
        *SMALL_SYNTHETIC,
        "model.branches=[efficientnet_lite0,small_cnn]",
        "model.pretrained=true",
        f"model.weights_dir={weights_dir}",
        "model.trainable_layers=0",
        "data.augment.enabled=false",
        "metrics.bootstrap=0",
        "gradcam.n_images=0",
        *extra,
    ]


def latest_run(tracking_uri: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id], order_by=["start_time"])
    return runs[-1]


def test_cached_run_gives_the_same_probabilities_and_serving_needs_no_cache(
    train_task, tracking_uri: str, tmp_path: Path, weights_dir: Path
) -> None:
    client = mlflow.MlflowClient(tracking_uri)
    cache = tmp_path / "cache"

    def cached_run(out: str) -> mlflow.entities.Run:
        cfg = ["trainer.max_epochs=2", "model.feature_cache=true", f"+data.cache_dir={cache}"]
        train_task(frozen_run(weights_dir, *cfg, f"paths.output_dir={tmp_path}/{out}"))
        return latest_run(tracking_uri)

    train_task(frozen_run(weights_dir, "trainer.max_epochs=2", f"paths.output_dir={tmp_path}/live"))
    live = latest_run(tracking_uri)
    cached = cached_run("cached")
    assert cached.data.params["feature_cache/branches"] == "efficientnet_lite0"
    assert cached.data.params["feature_cache/computed"] == "efficientnet_lite0"
    assert cached.data.params["feature_cache/augmentation"] == "none (un-augmented images)"
    assert len(list((cache / "features").glob("efficientnet_lite0-*.pt"))) == 1

    # validation in every epoch and the test pass give the same numbers as the run without the cache
    for metric in ("val/fused/auroc", "val/loss", "val/efficientnet_lite0/auroc"):
        a = [m.value for m in client.get_metric_history(live.info.run_id, metric)]
        b = [m.value for m in client.get_metric_history(cached.info.run_id, metric)]
        assert len(a) == 2 and np.allclose(a, b, atol=1e-5), metric
    logged = pd.read_csv(tmp_path / "cached/test_predictions.csv").set_index("name")
    without = pd.read_csv(tmp_path / "live/test_predictions.csv").set_index("name")
    probs = [c for c in logged.columns if "/" in c]
    np.testing.assert_allclose(logged[probs].to_numpy(), without.loc[logged.index, probs].to_numpy(), atol=1e-5)

    # a second run reads the file instead of computing it
    again = cached_run("again")
    assert again.data.params["feature_cache/read"] == "efficientnet_lite0"
    assert again.data.params["feature_cache/computed"] == "none"

    # the checkpoint runs the backbone live: evaluate needs no cache and gives the logged probabilities
    shutil.rmtree(cache)
    model = load_classifier(tmp_path / "cached/checkpoints/best.ckpt")
    data_cfg = {
        "name": "synthetic",
        "n_train": 64,
        "n_val": 32,
        "n_test": 32,
        "image_size": 32,
        "seed": 42,
        "num_classes": 2,
        "batch_size": 16,
    }
    _, frame, _ = evaluate_model(model, data_cfg, "test", n_bootstrap=0)
    frame = frame.set_index("name").loc[logged.index]
    np.testing.assert_allclose(frame[probs].to_numpy(), logged[probs].to_numpy(), atol=1e-5)


@pytest.mark.slow
# average (the default fusion) is the cached run of the equality test above; voting runs all-cached here
@pytest.mark.parametrize("fusion", ["stacking", "concat", "all-cached"])
def test_mixed_ensemble_trains_with_every_fusion(
    train_task, tracking_uri: str, weights_dir: Path, fusion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up = []
    lookup = FeatureStore.lookup
    monkeypatch.setattr(FeatureStore, "lookup", lambda self, *a: looked_up.append(a[0]) or lookup(self, *a))
    # a cached frozen branch beside a branch that trains from scratch (with augmentation)
    all_cached = ["model.branches=[efficientnet_lite0,efficientnet_lite0]", "fusion=voting"]
    extra = [f"fusion={fusion}"] if fusion != "all-cached" else all_cached
    train_task([*frozen_run(weights_dir, "model.feature_cache=true", *extra), "data.augment.enabled=true"])
    run = latest_run(tracking_uri)
    assert run.info.status == "FINISHED"
    cached = "efficientnet_lite0,efficientnet_lite0_2" if fusion == "all-cached" else "efficientnet_lite0"
    assert run.data.params["feature_cache/branches"] == cached
    assert run.data.metrics["test/fused/auroc"] >= 0
    assert looked_up.count("train") == 4 and looked_up.count("val") == 2  # every step read the cache


@pytest.mark.parametrize(
    ("branches", "per_branch", "sizes"),
    [
        # by branch name: efficientnet_lite1 frozen and cached, efficientnet_lite0 fine-tunes every stage
        (["efficientnet_lite0", "efficientnet_lite1"], ["model.trainable_layers={efficientnet_lite1: 0}"], [32, 32]),
        # by branch key: the second copy of one backbone frozen at its own size beside the first, fine-tuned
        (
            ["efficientnet_lite0", "efficientnet_lite0"],
            [
                "model.trainable_layers={efficientnet_lite0_2: 0}",
                "model.branch_sizes={efficientnet_lite0: 32, efficientnet_lite0_2: 48}",
                "data.image_size=48",
            ],
            [32, 48],
        ),
    ],
)
def test_one_pretrained_branch_cached_beside_one_fine_tuned(
    train_task,
    tracking_uri: str,
    tmp_path: Path,
    weights_dir: Path,
    branches: list[str],
    per_branch: list[str],
    sizes: list[int],
) -> None:
    """The second branch is frozen and cached, the first fine-tunes every stage."""
    overrides = [
        f"model.branches=[{','.join(branches)}]",
        *per_branch,
        "model.feature_cache=true",
        "trainer.max_epochs=1",
        f"paths.output_dir={tmp_path}/mixed",
    ]
    train_task(frozen_run(weights_dir, *overrides))
    run = latest_run(tracking_uri)
    trained = load_classifier(tmp_path / "mixed/checkpoints/best.ckpt")
    assert run.info.status == "FINISHED" and trained.sizes == sizes
    assert run.data.params["feature_cache/branches"] == trained.keys[1]
    pretrained = FusionClassifier(
        branches, 2, {"name": "average"}, image_size=max(sizes), pretrained=True, weights_dir=weights_dir
    )
    for i, key in enumerate(trained.keys):
        before, after = pretrained.backbones[key].state_dict(), trained.backbones[key].state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert bool(changed) is (i == 0), key
        if i == 0:
            assert "conv_stem.weight" in changed  # its lowest stage trains too


def test_feature_cache_without_a_frozen_branch_or_with_mixup_is_a_config_error(train_task, weights_dir: Path) -> None:
    with pytest.raises(ConfigError, match="model.trainable_layers=0"):
        train_task([*frozen_run(weights_dir, "model.feature_cache=true"), "model.trainable_layers=null"])
    with pytest.raises(ConfigError, match="cannot be combined with model.mixup"):
        train_task([*frozen_run(weights_dir, "model.feature_cache=true"), "model.mixup.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match="needs augmentation"):
        train_task([*frozen_run(weights_dir, "model.feature_cache=true"), "model.feature_cache_views=2"])


# ---- the store itself --------------------------------------------------------------------------------------
def frozen_model(weights_dir: Path, **kw) -> FusionClassifier:
    torch.manual_seed(0)
    return FusionClassifier(
        branches=["efficientnet_lite0", "small_cnn"],
        num_classes=2,
        fusion={"name": "average"},
        image_size=32,
        pretrained=True,
        weights_dir=str(weights_dir),
        **kw,
    )


def image_set(n: int, seed: int) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=gen)
    return ImageSet(images, torch.arange(n) % 2, [str(i) for i in range(n)], [f"{seed}-{i}.png" for i in range(n)])


def test_hits_misses_key_changes_and_damaged_files(weights_dir: Path, tmp_path: Path, caplog) -> None:
    model = frozen_model(weights_dir)
    train, val = image_set(12, 0), image_set(6, 1)
    store, report = build_store(model, ["efficientnet_lite0"], train, val, tmp_path, batch_size=5)
    assert report.misses == ["efficientnet_lite0"] and report.hits == []
    assert store.train["efficientnet_lite0"].shape == (1, 12, model.backbones["efficientnet_lite0"].num_features)
    assert store.needs_images  # small_cnn still reads the images
    with torch.no_grad():  # the cached rows are the live backbone's features (eval mode) of those images
        live = model.eval().branch_features(val.images, 0)
    torch.testing.assert_close(store.val["efficientnet_lite0"][0], live, atol=1e-5, rtol=1e-5)

    again, report = build_store(model, ["efficientnet_lite0"], train, val, tmp_path)
    assert report.hits == ["efficientnet_lite0"]
    assert torch.equal(again.train["efficientnet_lite0"], store.train["efficientnet_lite0"])

    # a changed key recomputes into another file: other images, another input size
    _, report = build_store(model, ["efficientnet_lite0"], image_set(12, 5), val, tmp_path)
    assert report.misses == ["efficientnet_lite0"]
    resized = frozen_model(weights_dir, branch_sizes={"efficientnet_lite0": 24})
    _, report = build_store(resized, ["efficientnet_lite0"], train, val, tmp_path)
    assert report.misses == ["efficientnet_lite0"]
    assert len(list((tmp_path / "features").glob("*.pt"))) == 3
    # CLAHE's grid changes the features: another file, not the first CLAHE model's
    for grid in ([4, 4], [2, 2]):
        clahe = frozen_model(weights_dir, equalize="clahe", clahe_grid=grid)
        assert build_store(clahe, ["efficientnet_lite0"], train, val, tmp_path)[1].misses == ["efficientnet_lite0"]
    assert len(list((tmp_path / "features").glob("*.pt"))) == 5

    # a damaged file is a miss (with a warning), and is written again whole
    path = Path(build_store(model, ["efficientnet_lite0"], train, val, tmp_path)[1].files["efficientnet_lite0"])
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        repaired, report = build_store(model, ["efficientnet_lite0"], train, val, tmp_path)
    assert report.misses == ["efficientnet_lite0"] and "damaged" in caplog.text
    assert torch.equal(repaired.train["efficientnet_lite0"], store.train["efficientnet_lite0"])
    assert build_store(model, ["efficientnet_lite0"], train, val, tmp_path)[1].hits == ["efficientnet_lite0"]


def test_augmented_views_are_drawn_once_with_a_fixed_seed(weights_dir: Path, tmp_path: Path) -> None:
    model = frozen_model(weights_dir, tta="flips_scales", tta_scales=[1.25])
    train, val = image_set(8, 0), image_set(4, 1)
    augment = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomAffine(degrees=10)])
    rng = torch.get_rng_state()
    store, _ = build_store(model, ["efficientnet_lite0"], train, val, None, views=3, augment=augment, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's own random stream is untouched
    feats = store.train["efficientnet_lite0"]
    assert feats.shape[:2] == (3, 8)
    assert not torch.allclose(feats[0], feats[1]) and not torch.allclose(feats[1], feats[2])
    same, _ = build_store(model, ["efficientnet_lite0"], train, val, None, views=3, augment=augment, seed=3)
    assert torch.equal(same.train["efficientnet_lite0"], feats)  # fixed seed: the same views
    # tta=flips_scales: the images at scales 1 and 1.25, then their mirrors at both
    assert store.val["efficientnet_lite0"].shape[0] == 4

    index = torch.tensor([0, 5, 7])
    torch.manual_seed(0)
    plain, mirrored = store.lookup("train", index, torch.device("cpu"))
    rows = plain["efficientnet_lite0"]
    assert mirrored is None
    for r, i in enumerate(index.tolist()):  # each row is one of that image's views
        assert any(torch.equal(rows[r], feats[v, i]) for v in range(3))
    plain, others = store.lookup("val", torch.tensor([1, 2]), torch.device("cpu"))
    assert len(others) == 3  # the views after the plain one, in model.views order
    for t in range(1, len(model.views)):
        assert torch.equal(others[t - 1]["efficientnet_lite0"], store.val["efficientnet_lite0"][t, [1, 2]])
    view = model.views[-1]
    # each view's row is that view's live features: mirrored and resized as the model's forward does
    x = view.apply(val.images[[1, 2]])
    with torch.no_grad():
        live = model.eval().branch_features(x, 0, None, view)
    assert torch.allclose(others[-1]["efficientnet_lite0"], live, atol=1e-5)

    fold = store.subset_train([2, 3])
    assert torch.equal(fold.train["efficientnet_lite0"], feats[:, [2, 3]])


def test_predictions_from_cached_features_equal_the_live_ones(weights_dir: Path) -> None:
    from xrayfusion.evaluation.inference import predict

    train, val = image_set(10, 0), image_set(6, 1)
    model = frozen_model(weights_dir, tta="flips_scales", tta_scales=[0.75]).eval()
    store, _ = build_store(model, ["efficientnet_lite0"], train, val, None)
    live, cached = predict(model, val, 4), predict(model, val, 4, store.eval_features("val", len(model.views)))
    assert torch.allclose(cached.fused, live.fused, atol=1e-5) and torch.allclose(cached.logits, live.logits, atol=1e-5)
    # training images (a cross-fit fold's held-out rows) have only the plain view cached: tta models predict live
    assert store.eval_features("train", len(model.views), [1, 2]) is None

    plain = frozen_model(weights_dir).eval()
    store, _ = build_store(plain, ["efficientnet_lite0"], train, val, None)
    held = [7, 2, 5]
    features = store.eval_features("train", 1, held)
    assert torch.allclose(
        predict(plain, train.subset(held), 2, features).fused, predict(plain, train.subset(held)).fused, atol=1e-5
    )
    with pytest.raises(ValueError, match="1 test-time views and the data 10 images"):
        predict(plain, train, 4, store.eval_features("train", 1, held))
    augment = v2.RandomAffine(degrees=10)
    views, _ = build_store(plain, ["efficientnet_lite0"], train, val, None, views=2, augment=augment, seed=1)
    assert views.eval_features("train", 1, held) is None  # augmented views: the un-augmented image is not stored
    one, _ = build_store(plain, ["efficientnet_lite0"], train, val, None, views=1, augment=augment, seed=1)
    assert one.eval_features("train", 1, held) is None  # one augmented view is no un-augmented row either
    assert one.subset_train(held).eval_features("train", 1, [0]) is None  # nor is a fold's subset of it
    assert views.eval_features("val", 1) is not None


@pytest.mark.slow
@pytest.mark.parametrize("folds", [2, 0])
def test_auto_cv_on_a_saturated_validation_fits_out_of_fold_from_the_cache(
    train_task, tracking_uri: str, tmp_path: Path, weights_dir: Path, folds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xrayfusion.training import folds as folds_module

    held_out = []
    predict = folds_module.predict
    monkeypatch.setattr(
        folds_module, "predict", lambda m, data, bs, feats=None: held_out.append(feats) or predict(m, data, bs, feats)
    )
    # saturated_at just above chance: the blob images are learnt in one epoch, so validation counts as saturated
    auto = ["fusion.weights=learned", "fusion.cv=auto", "fusion.auto_cv.saturated_at=0.5001"]
    train_task(frozen_run(weights_dir, "model.feature_cache=true", *auto, f"fusion.auto_cv.folds={folds}"))
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    [run] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the folds are its nested runs
    params, metrics = run.data.params, run.data.metrics
    best = max(metrics["val/efficientnet_lite0/auroc"], metrics["val/small_cnn/auroc"])
    assert best >= 0.5001 and params["fusion/cv_rule"] == "auto"
    assert (
        params["fusion/cv_reason"].startswith("validation saturated: best branch")
        and f"{best:.4f}" in params["fusion/cv_reason"]
    )
    if folds:
        assert params["fusion/fitted_on"] == "oof_cv2"
        # each fold predicted its held-out training images from the cached features of the frozen branch
        assert len(held_out) == 2 and all(f is not None and set(f) == {"efficientnet_lite0"} for f in held_out)
        rows = pd.read_csv(tmp_path / "outputs/run/oof_predictions.csv")
        assert len(rows) == 64 and set(rows["fold"]) == {1, 2}
    else:  # no fit: the weights stay equal, and the threshold is chosen on validation directly
        assert params["fusion/fitted_on"] == "none" and not held_out
        assert float(params["average/weight_efficientnet_lite0"]) == float(params["average/weight_small_cnn"]) == 0.5
        assert params["threshold/fused_chosen_on"] == "val"
    assert run.info.status == "FINISHED"
