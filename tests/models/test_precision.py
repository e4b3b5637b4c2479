"""model.bf16_branches=auto: the choice, where it is skipped, and that folds and resumed runs reuse it."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from tests.conftest import REPO
from xrayfusion.core.errors import ConfigError
from xrayfusion.data import XRayDataModule
from xrayfusion.models import precision
from xrayfusion.models.precision import BranchTiming
from xrayfusion.training.factory import bf16_param, build_model
from xrayfusion.training.resume import checkpoint_hparams

BASE = ["data=synthetic", "data.n_train=16", "data.n_val=8", "data.n_test=8", "data.image_size=32"]


def _cfg(*overrides: str) -> tuple[DictConfig, XRayDataModule]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, "model.branches=[small_cnn,resnet18]", *overrides])
    dm = XRayDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    dm.prepare()
    return cfg, dm


class TimingCalls(list):
    """The batch size of each timing, and (`trainable`) the stages it was told each branch trains."""

    def __init__(self) -> None:
        super().__init__()
        self.trainable: list[dict] = []


@pytest.fixture
def fake_timings(monkeypatch) -> TimingCalls:
    """small_cnn 2x faster in bf16, resnet18 slower; counts how often branches were timed."""
    calls = TimingCalls()

    def fake(model, batch_size, image_size, device="cpu", steps=2, trainable_layers=None):
        calls.append(batch_size)
        calls.trainable.append(dict(trainable_layers or {}))
        return [BranchTiming("small_cnn", 1.0, 0.5), BranchTiming("resnet18", 1.0, 1.2)]

    monkeypatch.setattr(precision, "time_branches", fake)
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "amx")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


def test_build_model_resolves_auto_by_timing(fake_timings: TimingCalls) -> None:
    cfg, dm = _cfg("model.bf16_branches=auto", "data.batch_size=8")
    model = build_model(cfg, dm)
    assert fake_timings == [8] and model.bf16_keys == {"small_cnn"}
    assert model.hparams.bf16_branches == ["small_cnn"] and bf16_param(cfg, model) == "small_cnn"


def test_auto_times_the_stages_the_run_trains(fake_timings: TimingCalls) -> None:
    build_model(*_cfg("model.bf16_branches=auto"))
    build_model(*_cfg("model.bf16_branches=auto", "model.trainable_layers=2"))
    # no pretrained weights here, so model.trainable_layers freezes every branch (as BackboneFreeze does)
    assert fake_timings.trainable == [{}, {"small_cnn": 2, "resnet18": 2}]


def test_a_resolved_list_skips_timing(fake_timings: TimingCalls, tmp_path) -> None:
    # what train() does for cross-fitting folds and for a resumed run: the measured list, not a new timing
    cfg, dm = _cfg("model.bf16_branches=auto")
    first = build_model(cfg, dm)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(first)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = checkpoint_hparams(tmp_path / "last.ckpt")["bf16_branches"]
    assert saved == ["small_cnn"]
    again = build_model(cfg, dm, bf16_branches=saved)
    assert fake_timings == [32] and again.bf16_keys == {"small_cnn"}  # timed once, for the first model only


def test_auto_is_not_timed_under_bf16_trainer_precision_or_cpu_ddp(fake_timings: TimingCalls) -> None:
    cfg, dm = _cfg("model.bf16_branches=auto", "trainer.precision=bf16-mixed")
    model = build_model(cfg, dm)
    assert model.bf16_keys == frozenset() and bf16_param(cfg, model) == "all (trainer.precision=bf16-mixed)"
    cfg, dm = _cfg("model.bf16_branches=auto", "trainer=ddp_cpu")
    assert build_model(cfg, dm).bf16_keys == frozenset()
    assert fake_timings == []


def test_explicit_list_is_used_as_given(fake_timings: TimingCalls) -> None:
    cfg, dm = _cfg("model.bf16_branches=[resnet18]")
    model = build_model(cfg, dm)
    assert model.bf16_keys == {"resnet18"} and fake_timings == [] and bf16_param(cfg, model) == "resnet18"
    cfg, dm = _cfg()
    assert bf16_param(cfg, build_model(cfg, dm)) == "none"


def test_named_branches_train_in_float32_on_a_cpu_without_bf16_units(fake_timings, monkeypatch, caplog) -> None:
    from xrayfusion.training.factory import bf16_fallback_param

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "none")
    cfg, dm = _cfg("model.bf16_branches=[resnet18]")
    with caplog.at_level("WARNING"):
        model = build_model(cfg, dm)
    assert model.bf16_keys == frozenset() and model.hparams.bf16_branches == []
    assert bf16_param(cfg, model) == "none"
    assert bf16_fallback_param(cfg, model) == "float32 (no bf16 units on this CPU): resnet18"
    assert "neither AMX nor AVX512-BF16" in caplog.text and "model.bf16_fallback=emulate" in caplog.text
    cfg, dm = _cfg("model.bf16_branches=all")
    assert (
        bf16_fallback_param(cfg, model := build_model(cfg, dm))
        == ("float32 (no bf16 units on this CPU): small_cnn,resnet18")
        and model.bf16_keys == frozenset()
    )
    # emulate keeps the bf16 the config names; a GPU run and a CPU with bf16 units never fall back
    for overrides, cpu in (
        ("model.bf16_fallback=emulate", "none"),
        ("trainer.accelerator=gpu", "none"),
        ("seed=0", "amx"),
    ):
        monkeypatch.setattr(precision, "cpu_bf16_support", lambda cpu=cpu: cpu)
        cfg, dm = _cfg("model.bf16_branches=[resnet18]", overrides)
        model = build_model(cfg, dm)
        assert model.bf16_keys == {"resnet18"} and bf16_fallback_param(cfg, model) is None, overrides


def test_bad_bf16_fallback_is_a_config_error() -> None:
    from xrayfusion.training.config import validate

    cfg, _ = _cfg("model.bf16_fallback=fp16")
    with pytest.raises(ConfigError, match=r"model.bf16_fallback='fp16' must be one of float32, emulate"):
        validate(cfg)


@pytest.mark.parametrize("value", ["true", "3", "fast"])
def test_bad_bf16_branches_values_are_config_errors(value: str) -> None:
    from xrayfusion.training.config import validate

    cfg, _ = _cfg(f"model.bf16_branches={value}")
    with pytest.raises(ConfigError, match="list of branch names, 'all' or 'auto'"):
        validate(cfg)
