import pytest
import torch

from xrayfusion.core.errors import ConfigError
from xrayfusion.fusion.strategies import AverageFusion, StackingFusion, VotingFusion, build_fusion


def probs_of(*rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float)


def test_average_weighted_and_normalised() -> None:
    p = probs_of([[0.9, 0.1], [0.3, 0.7]])
    fused, logits = AverageFusion(2, 2, weights=[3, 1])(p, [])
    assert logits is None and torch.allclose(fused, torch.tensor([[0.75, 0.25]]))
    with pytest.raises(ConfigError, match="fusion.weights"):
        AverageFusion(2, 2, weights=[1.0])


def test_hard_voting_vote_share_and_tie_break() -> None:
    voting = VotingFusion(3, 2)
    fused, _ = voting(probs_of([[0.4, 0.6], [0.45, 0.55], [0.99, 0.01]]), [])
    assert fused.argmax(1).item() == 1  # 2 of 3 votes beat one confident branch
    tie, _ = VotingFusion(2, 2)(probs_of([[0.4, 0.6], [0.9, 0.1]]), [])
    assert tie.argmax(1).item() == 0  # one vote each: mean probability decides
    assert torch.allclose(tie.sum(1), torch.ones(1))
    soft, _ = VotingFusion(2, 2, soft=True)(probs_of([[0.4, 0.6], [0.9, 0.1]]), [])
    assert torch.allclose(soft, torch.tensor([[0.65, 0.35]]))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_stacking_learns_to_trust_the_informative_branch(num_classes: int) -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, num_classes, (400,), generator=gen)
    good = torch.nn.functional.one_hot(y, num_classes).float() * 0.8 + 0.2 / num_classes
    noise = torch.rand(400, num_classes, generator=gen).softmax(1)
    probs = torch.stack([noise, good], dim=1)
    stack = StackingFusion(2, num_classes)
    before, _ = stack(probs, [])
    assert torch.allclose(before, probs.mean(1))
    stack.fit(probs, y)
    fused, _ = stack(probs, [])
    assert (fused.argmax(1) == y).float().mean() > 0.95
    restored = StackingFusion(2, num_classes)
    restored.load_state_dict(stack.state_dict())
    assert torch.allclose(restored(probs, [])[0], fused)


def test_build_fusion_errors() -> None:
    with pytest.raises(ConfigError, match="unknown fusion"):
        build_fusion({"name": "median"}, 2, 2, [8, 8])
    with pytest.raises(ConfigError, match="at least 2 branches"):
        build_fusion({"name": "stacking"}, 1, 2, [8])
    concat = build_fusion({"name": "concat", "dropout": 0.0}, 2, 2, [4, 6])
    fused, logits = concat(torch.rand(5, 2, 2), [torch.rand(5, 4), torch.rand(5, 6)])
    assert fused.shape == (5, 2) and logits.shape == (5, 2)


def test_learned_weights_reach_the_log_loss_optimum_on_a_flat_loss_surface() -> None:
    # two near-copies of one confident branch: the log-loss moves by ~1e-4 over all weights, which once made
    # the optimiser stop at its uniform starting point
    import numpy as np

    from xrayfusion.fusion.strategies import learn_weights

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 1000)
    base = np.where(labels == 1, 4.0, -4.0) + rng.normal(0, 2.0, 1000)
    p1, p2 = (1 / (1 + np.exp(-(base + rng.normal(0, 0.3, 1000)))) for _ in range(2))
    probs = np.stack([np.stack([1 - p1, p1], 1), np.stack([1 - p2, p2], 1)], 1)
    p_true = probs[np.arange(1000), :, labels]
    grid = np.linspace(0, 1, 10001)
    best = grid[np.argmin([-np.log(p_true @ np.array([w, 1 - w])).mean() for w in grid])]
    assert abs(best - 0.5) > 0.1  # the optimum is far from the starting point
    assert learn_weights(probs, labels)[0] == pytest.approx(best, abs=2e-3)
