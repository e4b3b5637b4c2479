"""Meta-learners: JSON specs reproduce scikit-learn's predictions and survive a weights_only checkpoint."""

import io
import json

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from xrayfusion.core.errors import ConfigError
from xrayfusion.fusion import meta
from xrayfusion.fusion.strategies import StackingFusion, meta_features


def data(num_classes: int, n: int = 300, present: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, present or num_classes, n)
    x = rng.normal(size=(n, 4)) + y[:, None] * np.array([1.0, 0.5, 0.0, -0.7])
    return x, y


@pytest.mark.parametrize("kind", meta.META_LEARNERS)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_spec_reproduces_sklearn_predict_proba(kind: str, num_classes: int) -> None:
    x, y = data(num_classes)
    with threadpool_limits(1):  # sklearn's HGB crawls with OpenMP threads on a busy machine
        est = meta.make_estimator(kind, seed=0).fit(x, y)
        expected = est.predict_proba(x)
    spec = json.loads(json.dumps(meta.to_spec(kind, est)))  # through JSON, as in a checkpoint
    ours = meta.predict_proba(spec, torch.from_numpy(x), num_classes).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert meta.summary_params(spec)["stacking/meta"] == kind


@pytest.mark.parametrize("kind", meta.META_LEARNERS)
def test_class_absent_from_the_fit_gets_zero_probability(kind: str) -> None:
    x, y = data(3, present=2)
    spec = meta.fit_meta(kind, x, y)
    probs = meta.predict_proba(spec, torch.from_numpy(x), 3)
    assert torch.all(probs[:, 2] == 0) and torch.allclose(probs.sum(1), torch.ones(len(x), dtype=probs.dtype))


def test_fit_meta_errors() -> None:
    with pytest.raises(ConfigError, match="fusion.meta='svm'"):
        meta.fit_meta("svm", np.zeros((4, 2)), np.array([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="two classes"):
        meta.fit_meta("logreg", np.zeros((4, 2)), np.zeros(4, dtype=int))


@pytest.mark.parametrize("kind", meta.META_LEARNERS)
def test_stacking_checkpoint_holds_json_and_loads_without_pickle(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (200,), generator=gen)
    good = torch.nn.functional.one_hot(y, 2).float() * 0.6 + 0.2 + 0.1 * torch.rand(200, 2, generator=gen)
    probs = torch.stack([torch.rand(200, 2, generator=gen).softmax(1), good / good.sum(1, keepdim=True)], dim=1)
    stack = StackingFusion(2, 2, meta=kind)
    params = stack.fit(probs, y)
    assert params["stacking/meta"] == kind
    fused, _ = stack(probs, [])
    assert (fused.argmax(1) == y).float().mean() > 0.9
    buffer = io.BytesIO()
    torch.save(stack.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert json.loads(state["_extra_state"]["meta"])["kind"] == kind
    restored = StackingFusion(2, 2, meta=kind)
    restored.load_state_dict(state)
    assert torch.allclose(restored(probs, [])[0], fused)
    assert meta_features(probs).shape == (200, 2)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_stored_hgb_is_exact_on_saturated_float32_probabilities(num_classes: int) -> None:
    """Branch probabilities arrive as float32 at and just below 1; a split between the two (0.99999997) must
    not round to 1.0 at inference, as it does when the stored trees are evaluated in float32."""
    rng = np.random.default_rng(3)
    n, k = 400, 2
    y = rng.integers(0, num_classes, n)
    below_one = np.nextafter(np.float32(1), np.float32(0))  # 0.99999994
    top = np.where(y == 1, np.float32(1.0), below_one).astype(np.float32)  # class 1 saturates exactly at 1.0
    top = np.where(rng.random(n) < 0.1, below_one, top)  # some noise so the trees stay shallow
    probs = np.zeros((n, k, num_classes), dtype=np.float32)
    probs[:, :, 0] = 1 - top[:, None]
    probs[:, :, -1] += top[:, None] if num_classes == 2 else 0
    if num_classes == 3:
        probs[:, :, 1] = top[:, None]
    probs32 = torch.from_numpy(probs)
    stack = StackingFusion(k, num_classes, meta="hgb")
    stack.fit(probs32.double(), torch.from_numpy(y))  # what training fits on
    features = meta_features(probs32.double()).numpy()  # the float32 values, exactly, as float64
    with threadpool_limits(1):
        est = meta.make_estimator("hgb", seed=0).fit(features, y)
        expected = est.predict_proba(features)
    fused, _ = stack(probs32, [])  # what the model computes at inference, from float32 inputs
    assert fused.dtype == torch.float32
    np.testing.assert_allclose(fused.double().numpy(), expected, atol=1e-6)


def test_hgb_export_refuses_an_untested_sklearn() -> None:
    meta.check_hgb_export((1, 5))
    with pytest.raises(ConfigError, match="fusion.meta=logreg"):
        meta.check_hgb_export((2, 0))
    with pytest.raises(ConfigError, match="scikit-learn"):
        meta.check_hgb_export((1, 3))
