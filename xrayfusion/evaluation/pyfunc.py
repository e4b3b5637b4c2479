"""The ensemble as an MLflow pyfunc model: image paths in, fused and per-branch probabilities out."""

from __future__ import annotations

import base64
import binascii
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

import xrayfusion

log = logging.getLogger(__name__)

MODEL_NAME = "model"
PATH_COLUMN = "path"
IMAGE_COLUMN = "image"  # base64 of the image file's bytes
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "kornia",
    "pytorch-lightning",
    "torchmetrics",
    "scikit-learn",
    "pillow",
    "pandas",
    "numpy",
    "omegaconf",
    "mlflow",
)


@contextmanager
def _dropping_warning(text: str) -> Iterator[None]:
    """Drop warnings whose message contains `text` inside the block. MLflow re-enables its UserWarnings with
    its own `simplefilter` while it checks a model class, so a plain filter does not reach them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, *args: Any, **kwargs: Any) -> None:
            if text not in str(message):
                shown(message, *args, **kwargs)

        warnings.showwarning = show
        yield


# MLflow warns at class creation that `predict` has no type hints: it has none on purpose (they would become
# the served schema), so that warning is for nobody
with _dropping_warning("Add type hints to the `predict` method"):

    class EnsembleModel(PythonModel):
        """pyfunc wrapper: a DataFrame with a `path` column (image files on the serving machine) and/or an `image`
        column (the image file's bytes, base64-encoded: what a REST client has) -> the xrayfusion.predict columns.

        Each image is decoded as grey uint8 and resized to the trained size, as in training. The rows are JSON-safe:
        an unreadable image gets its reason as a string in `error` and nulls (never NaN) elsewhere.
        """

        def load_context(self, context: PythonModelContext) -> None:
            from xrayfusion.evaluation.loading import load_classifier

            self.model = load_classifier(context.artifacts["checkpoint"])

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would treat them as a schema
            from xrayfusion.evaluation.predict import predict_images_of

            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({PATH_COLUMN: model_input})
            out = predict_images_of(self.model, input_items(frame))
            return out.astype(object).where(out.notna(), None)


def input_items(frame: pd.DataFrame) -> list[tuple[str, str | bytes]]:
    """(name, source) per row: the base64 `image` bytes when given, else the `path`; bad base64 is an error row."""
    has_image = IMAGE_COLUMN in frame.columns
    has_path = PATH_COLUMN in frame.columns
    if not (has_image or has_path):
        frame = frame.rename(columns={frame.columns[0]: PATH_COLUMN})
        has_path = True
    items: list[tuple[str, str | bytes]] = []
    for i, row in enumerate(frame.itertuples(index=False)):
        encoded = getattr(row, IMAGE_COLUMN) if has_image else None
        path = getattr(row, PATH_COLUMN) if has_path else None
        if isinstance(encoded, str) and encoded:
            name = str(path) if isinstance(path, str) and path else f"{IMAGE_COLUMN}[{i}]"
            try:
                items.append((name, base64.b64decode(encoded, validate=True)))
            except (binascii.Error, ValueError):
                items.append((name, b""))  # decodes to the error row "zero-byte image"
        else:
            items.append((str(path), str(path)))
    return items


def input_example() -> pd.DataFrame:
    """One self-contained request: a small grey PNG as base64 in the `image` column (what a REST client sends)."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1)), mode="L").save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode()]})


def pip_requirements() -> list[str]:
    """The installed versions of what the model needs to load."""
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


@contextmanager
def _active_run(tracking_uri: str, run_id: str):
    """Make `run_id` the fluent API's active run on `tracking_uri`, restoring the previous URI after."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
            yield run
    finally:
        mlflow.set_tracking_uri(previous)


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    ckpt_path: str | Path,
    register_as: str | None = None,
    aliases: Sequence[str] = (),
) -> str:
    """Log the checkpoint as a pyfunc model at artifact path `model` of the run (optionally registered as
    `register_as`, the new version given each of `aliases`, e.g. `candidate`, for `models:/<name>@candidate`).

    Returns the model URI `runs:/<run_id>/model`. The run keeps the status the caller gives it afterwards.
    """
    client = mlflow.MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with _active_run(tracking_uri, run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(Path(__file__).with_name("served_model.py")),  # models-from-code, no cloudpickle
            artifacts={"checkpoint": str(ckpt_path)},
            code_paths=[str(Path(xrayfusion.__file__).parent)],
            signature=ModelSignature(
                inputs=Schema(
                    [ColSpec("string", PATH_COLUMN, required=False), ColSpec("string", IMAGE_COLUMN, required=False)]
                )
            ),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=register_as or None,
        )
    if status == "RUNNING":  # end_run() finished it; the caller still logs to it
        client.update_run(run_id, status="RUNNING")
    if register_as:
        for alias in aliases:
            client.set_registered_model_alias(register_as, alias, info.registered_model_version)
    uri = f"runs:/{run_id}/{MODEL_NAME}"
    log.info("logged pyfunc model %s%s", uri, f" registered as {register_as}" if register_as else "")
    return uri
