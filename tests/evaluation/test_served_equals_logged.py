"""What a run logs for an image equals what evaluate, predict and the served model give for it."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import mlflow_models_predict
from xrayfusion.evaluation.evaluate import evaluate_model
from xrayfusion.evaluation.loading import load_classifier
from xrayfusion.evaluation.predict import predict_files

KERMANY = ["data=kermany", "data.image_size=32", "data.batch_size=8", "data.val_fraction=0.25", "data.cache_dir=null"]
RUN = [
    *KERMANY,
    "model=ensemble",
    "model.branches=[small_cnn,darknet]",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "metrics.bootstrap=0",
    "metrics.threshold=youden",
    "gradcam.n_images=0",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["fusion=stacking", "seed=7", "model.equalize=clahe", "model.clahe.grid=[4,4]"],
        [
            "fusion=average",
            "trainer.precision=bf16-mixed",
            "model.tta=flips_scales",
            "model.tta_scales=[1.25]",
            "model.equalize=hist",
            "model.branch_sizes={small_cnn: 24}",
        ],
    ],
    ids=["stacking-clahe", "bf16-mixed-tta-hist-branch-sizes"],
)
def test_logged_test_results_equal_evaluate_predict_and_served(
    train_task, tracking_uri: str, tmp_path: Path, kermany_root: Path, extra: list[str]
) -> None:
    train_task([*RUN, f"data.root={kermany_root}", *extra])
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])
    logged = pd.read_csv(tmp_path / "outputs/run/test_predictions.csv").set_index("name")
    ckpt = tmp_path / "outputs/run/checkpoints/best.ckpt"
    model = load_classifier(ckpt)
    if "trainer.precision=bf16-mixed" in extra:
        assert model.hparams.autocast == "bf16"  # stored: served in the precision it was tested in
        # and with the test-time augmentation it was tested with: the image and its mirror, each at 1 and 1.25x
        assert model.hparams.tta == "flips_scales" and [(v.flip, v.scale) for v in model.views] == [
            (False, 1.0),
            (False, 1.25),
            (True, 1.0),
            (True, 1.25),
        ]
        assert model.sizes == [24, 32]  # and each branch at its own input size (small_cnn 24 px, darknet 32 px)
    # the input equalisation is part of the model: evaluate, predict and the served model equalise alike
    assert model.hparams.equalize == ("clahe" if "model.equalize=clahe" in extra else "hist")

    # evaluate on the same data config: the same probabilities and exactly the logged metric values
    data_cfg = {"name": "kermany", "root": str(kermany_root), "val_fraction": 0.25, "batch_size": 8, "seed": 42}
    results, frame, diversity = evaluate_model(model, data_cfg, "test", n_bootstrap=0)
    frame = frame.set_index("name").loc[logged.index]
    np.testing.assert_allclose(frame["fused/PNEUMONIA"], logged["fused/PNEUMONIA"], atol=1e-5)
    for row in results.itertuples():
        key = f"test/{row.model}/{row.metric}"
        if np.isfinite(row.value):
            assert run.data.metrics[key] == row.value, key
    # and the branches' diversity the run logged for its test pass
    assert diversity and all(
        run.data.metrics[f"test/diversity/{k}"] == pytest.approx(v) for k, v in diversity.items() if np.isfinite(v)
    )

    if "seed=7" in extra:  # evaluate split=val scores exactly the run's validation images, whatever its own seed
        _, val, _ = evaluate_model(model, data_cfg, "val", n_bootstrap=0)  # data_cfg has seed 42
        fitted_on = pd.read_csv(tmp_path / "outputs/run/oof_predictions.csv")  # the stacking fit's rows: val
        assert sorted(val["name"]) == sorted(fitted_on["name"])

    # predict on the image files, and the pyfunc model through MLflow's own CLI
    paths = [str(kermany_root / "test" / name) for name in logged.index]
    predicted = predict_files(model, paths).set_index("path")
    np.testing.assert_allclose(predicted.loc[paths, "fused_prob_PNEUMONIA"], logged["fused/PNEUMONIA"], atol=1e-5)
    out = mlflow_models_predict(tracking_uri, run.info.run_id, paths, tmp_path).set_index("path")
    np.testing.assert_allclose(out.loc[paths, "fused_prob_PNEUMONIA"], logged["fused/PNEUMONIA"], atol=1e-5)
    # and the decisions: the logged confusion counts are what predict's classes give
    positive = (predicted.loc[paths, "predicted_class"] == "PNEUMONIA").to_numpy()
    truth = logged["label"].to_numpy() == 1
    assert run.data.metrics["test/fused/recall"] == pytest.approx(positive[truth].mean(), abs=1e-12)
