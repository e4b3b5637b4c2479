"""Speed switches: workers, threads, compile flag, and no host syncs in the training step."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy

from xrayfusion.core.errors import ConfigError
from xrayfusion.core.runtime import configure_torch, resolve_workers
from xrayfusion.models import FusionClassifier
from xrayfusion.models.metrics import train_accuracy


def test_resolve_workers(monkeypatch) -> None:
    from xrayfusion.core import runtime as runtime_mod

    assert resolve_workers(3) == 3
    assert resolve_workers("2") == 2
    monkeypatch.setattr(runtime_mod, "available_cpus", lambda: 2)
    assert resolve_workers("auto") == 0  # small machines: workers would steal the compute
    monkeypatch.setattr(runtime_mod, "available_cpus", lambda: 16)
    assert resolve_workers("auto") == 4
    with pytest.raises(ConfigError, match="num_workers=-1"):
        resolve_workers(-1)
    with pytest.raises(ConfigError, match="'many'"):
        resolve_workers("many")


def test_configure_torch_sets_and_rejects() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_torch(threads=1)["threads"] == 1
        with pytest.raises(ConfigError, match="runtime.threads=0"):
            configure_torch(threads=0)
        with pytest.raises(ConfigError, match="fastest"):
            configure_torch(matmul_precision="fastest")
    finally:
        torch.set_num_threads(before)


def test_train_accuracy_matches_torchmetrics() -> None:
    probs1 = torch.rand(50)
    probs = torch.stack([1 - probs1, probs1], dim=1)
    target = torch.randint(0, 2, (50,))
    ours, ref = train_accuracy(2, threshold=0.3), BinaryAccuracy(threshold=0.3)
    ours.update(probs[:20], target[:20])
    ours.update(probs[20:], target[20:])
    ref.update(probs1, target)
    assert torch.isclose(ours.compute(), ref.compute())


def _model(branches: tuple[str, ...] = ("small_cnn", "resnet18"), **kw) -> FusionClassifier:
    # SGD: AdamW on CPU reads its step counters with .item() (host tensors, not device syncs)
    return FusionClassifier(
        list(branches),
        num_classes=2,
        fusion={"name": "average"},
        image_size=32,
        optimizer=functools.partial(torch.optim.SGD, lr=1e-2),
        **kw,
    )


def test_compile_keeps_checkpoint_keys() -> None:
    assert list(_model(compile=True).state_dict()) == list(_model().state_dict())


def _host_syncs(steps: int, callbacks: list | None = None, **model_kw) -> int:
    """Count tensor-to-host reads (`.item()` and friends) during a fit of `steps` training steps."""
    pl.seed_everything(0)
    x = torch.randint(0, 255, (8 * steps, 1, 32, 32), dtype=torch.uint8)
    y = torch.arange(8 * steps) % 2
    loader = DataLoader(list(zip(x, y, strict=True)), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )
    model = _model(("small_cnn",), **model_kw)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit(model, train_dataloaders=loader)
    counts = {e.key: e.count for e in prof.key_averages()}
    # torch._assert_async (kornia's range check of equalised images) reads its flag with .item() on the CPU only;
    # on CUDA it is a device-side assert, no host sync
    return counts.get("aten::_local_scalar_dense", 0) - counts.get("aten::_assert_async", 0)


def test_training_step_has_no_per_step_host_sync() -> None:
    assert _host_syncs(2) == _host_syncs(6)


def test_the_loss_guard_adds_no_per_step_host_sync_between_its_checks() -> None:
    from xrayfusion.training.callbacks import FiniteLossGuard

    sparse = _host_syncs(2, [FiniteLossGuard(every_n_steps=100)]), _host_syncs(6, [FiniteLossGuard(every_n_steps=100)])
    assert sparse[0] == sparse[1]  # one read-back at the epoch's end, however many steps
    assert _host_syncs(6, [FiniteLossGuard(every_n_steps=1)]) - _host_syncs(2, [FiniteLossGuard(every_n_steps=1)]) == 4


def test_ema_mixup_and_equalisation_add_no_per_step_host_sync() -> None:
    from xrayfusion.training.callbacks import ExponentialMovingAverage

    switches = {"equalize": "clahe", "clahe_grid": [4, 4], "mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}}
    counts = [_host_syncs(n, [ExponentialMovingAverage(decay=0.9)], **switches) for n in (2, 6)]
    assert counts[0] == counts[1]


def _capture_dtypes(model: FusionClassifier) -> dict[str, torch.dtype]:
    """The dtype of each branch's first conv output during one forward."""
    seen: dict[str, torch.dtype] = {}
    for key, backbone in model.backbones.items():
        conv = next(m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(
            lambda _m, _i, out, key=key: seen.update({key: out.dtype}) if key not in seen else None
        )
    model(torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8))
    return seen


def test_bf16_branches_autocast_only_the_named_branches() -> None:
    model = _model(bf16_branches=["small_cnn"])
    assert _capture_dtypes(model) == {"small_cnn": torch.bfloat16, "resnet18": torch.float32}
    out = model(torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8))
    assert out["probs"].dtype == torch.float32 and out["fused_probs"].dtype == torch.float32
    assert set(_capture_dtypes(_model(bf16_branches="all")).values()) == {torch.bfloat16}
    assert set(_capture_dtypes(_model()).values()) == {torch.float32}


def test_bf16_branch_keeps_an_outer_autocast() -> None:
    # under trainer.precision=bf16-mixed every branch stays bf16, listed or not
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert set(_capture_dtypes(_model(bf16_branches=["small_cnn"])).values()) == {torch.bfloat16}


def test_bf16_branch_trains_and_its_checkpoint_keeps_the_setting(tmp_path) -> None:
    model = _model(bf16_branches=["resnet18"])
    x = torch.randint(0, 255, (4, 1, 32, 32), dtype=torch.uint8)
    loss = model._loss(model(x), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    grads = [p.grad for p in model.backbones["resnet18"].parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = FusionClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.bf16_keys == {"resnet18"}


def test_bf16_branches_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"bf16_branches names \['vgg16'\].*model.branches"):
        _model(bf16_branches=["vgg16"])
    with pytest.raises(ValueError, match="'some'.*list of branch names, 'all' or 'auto'"):
        _model(bf16_branches="some")


def test_config_validation_names_a_bad_bf16_branch() -> None:
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO
    from xrayfusion.training.config import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.branches=[resnet18]", "model.bf16_branches=[small_cnn]"])
    with pytest.raises(ConfigError, match=r"bf16_branches names \['small_cnn'\]"):
        validate(cfg)


def test_slow_cpu_bf16_warning(monkeypatch, caplog) -> None:
    from xrayfusion.core import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: "none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.warn_slow_cpu_bf16("auto") and "emulated" in caplog.text
    assert not runtime.warn_slow_cpu_bf16("gpu")
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: "amx")
    assert not runtime.warn_slow_cpu_bf16("cpu")


def test_choose_bf16_branches_keeps_only_clear_gains() -> None:
    from xrayfusion.models.precision import BranchTiming, choose_bf16_branches

    timings = [BranchTiming("a", 1.0, 0.5), BranchTiming("b", 1.0, 0.95), BranchTiming("c", 1.0, 1.4)]
    assert choose_bf16_branches(timings) == ["a"]  # b gains 5%: inside the noise margin
    assert choose_bf16_branches(timings, min_speedup=1.0) == ["a", "b"]


def test_speedup_is_the_median_pair_ratio_so_one_outlier_cannot_decide(monkeypatch) -> None:
    from xrayfusion.models import precision
    from xrayfusion.models.precision import BranchTiming

    # a branch 1.2x slower in bf16, and one bf16 step that ran unusually fast (warm-up steps first)
    steps = iter([1.0, 1.2, 1.0, 1.2] + [1.0, 0.85, 1.2, 1.0, 1.0, 1.2, 1.2, 1.0, 1.0, 1.2])
    monkeypatch.setattr(precision, "_step_seconds", lambda branch, x, y, bf16: next(steps))
    fp32, bf16 = precision._paired_seconds(torch.nn.Identity(), torch.zeros(1), torch.zeros(1), steps=5)
    assert fp32 == [1.0] * 5 and bf16 == [0.85, 1.2, 1.2, 1.2, 1.2]  # alternating order: f b, b f, f b, ...
    timing = precision._timing("lite0", fp32, bf16)
    assert (timing.fp32_s, timing.bf16_s, len(timing.pair_speedups)) == (1.0, 1.2, 5)
    assert timing.speedup == pytest.approx(1.0 / 1.2) and precision.choose_bf16_branches([timing]) == []
    # the fastest step of each, what auto compared before, would have put the branch in bf16
    assert precision.choose_bf16_branches([BranchTiming("lite0", min(fp32), min(bf16))]) == ["lite0"]


def test_autotune_times_copies_and_sets_the_choice(monkeypatch) -> None:
    from xrayfusion.models import precision

    model = _model(bf16_branches="auto")
    assert model.bf16_keys == frozenset()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "amx")
    chosen, timings = precision.autotune_bf16(model, batch_size=4, image_size=32, min_speedup=0.0)
    assert [t.branch for t in timings] == ["small_cnn", "resnet18"]
    assert all(t.fp32_s > 0 and t.bf16_s > 0 for t in timings)
    assert chosen == ["small_cnn", "resnet18"] and model.bf16_keys == {"small_cnn", "resnet18"}
    assert model.hparams.bf16_branches == chosen  # what a checkpoint saves
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched: timing used copies
    assert all(p.grad is None for p in model.parameters())


def test_autotune_times_each_branch_at_its_own_size(monkeypatch) -> None:
    from xrayfusion.models import precision

    seen = {}

    def paired(branch, x, y, steps):
        seen[len(seen)] = tuple(x.shape[-2:])
        return [1.0], [0.5]

    monkeypatch.setattr(precision, "_paired_seconds", paired)
    model = _model(branch_sizes={"small_cnn": 16})
    precision.time_branches(model, batch_size=2, image_size=32)
    assert seen == {0: (16, 16), 1: (32, 32)}  # small_cnn trains on 16 px, resnet18 on the decoded 32 px


def test_autotune_times_the_step_the_run_trains_with_lower_stages_frozen(monkeypatch) -> None:
    from xrayfusion.models import precision
    from xrayfusion.models.backbones import backbone_stages

    seen = {}

    def paired(branch, x, y, steps):
        stages = backbone_stages(branch[0])
        trains = [all(p.requires_grad for m in stage for p in m.parameters(recurse=False)) for stage in stages]
        torch.nn.functional.cross_entropy(branch(x), y).backward()
        reached = [all(p.grad is not None for m in stage for p in m.parameters(recurse=False)) for stage in stages]
        assert reached == trains  # the backward pass reaches exactly the stages that train
        seen[len(seen)] = trains
        return [1.0], [0.5]

    monkeypatch.setattr(precision, "_paired_seconds", paired)
    model = _model()
    precision.time_branches(model, batch_size=2, image_size=32, trainable_layers={"resnet18": 2})
    assert all(seen[0])  # small_cnn: not listed, every stage trains
    assert seen[1] == [False] * (len(seen[1]) - 2) + [True, True]  # resnet18: its top two stages only
    assert all(p.requires_grad for p in model.parameters())  # the copies were frozen, not the model


def test_autotune_without_bf16_hardware_or_on_gpu_skips_timing(monkeypatch) -> None:
    from xrayfusion.models import precision

    monkeypatch.setattr(precision, "time_branches", lambda *a, **k: pytest.fail("timed without need"))
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "none")
    model = _model(bf16_branches="auto")
    assert precision.autotune_bf16(model, 4, 32) == ([], [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.autotune_bf16(model, 4, 32, on_gpu=True)[0] == ["small_cnn", "resnet18"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision.autotune_bf16(model, 4, 32, on_gpu=True)[0] == []  # V100/T4: bf16 only emulated
