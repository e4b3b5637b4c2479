"""Transfer learning: local/hub ImageNet weights, per-branch normalisation, freezing and fine-tuning."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import SMALL_SYNTHETIC
from xrayfusion.core.errors import ConfigError
from xrayfusion.models import FusionClassifier
from xrayfusion.models.backbones import backbone_stages, create_backbone, freeze_below_top, top_stages
from xrayfusion.models.pretrained import find_weights_file, resolve_weights
from xrayfusion.training import config as config_checks
from xrayfusion.training.finetuning import BackboneFreeze, freeze_callbacks, frozen_for_whole_run, trained_top_stages
from xrayfusion.training.run import parameter_summary

IMAGENET_GREY_MEAN = sum((0.485, 0.456, 0.406)) / 3


def marked_state_dict(name: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    """A full 1000-class RGB state dict of timm's `name` with recognisable values."""
    torch.manual_seed(0)
    state = timm.create_model(name).state_dict()
    for i, (key, value) in enumerate(state.items()):
        if value.is_floating_point():
            state[key] = torch.full_like(value, 0.01 * (i % 50 + 1))
    first = "conv_stem.weight" if "conv_stem.weight" in state else "conv1.weight"
    state[first] = torch.arange(state[first].numel(), dtype=torch.float).reshape(state[first].shape) / 1000
    return state


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    torch.save(marked_state_dict(), folder / "efficientnet_lite0_imagenet.pth")
    return folder


def test_weights_file_is_loaded_through_timm_with_grey_first_layer(weights_dir: Path) -> None:
    saved = marked_state_dict()
    backbone = create_backbone("efficientnet_lite0", in_chans=1, pretrained=True, weights_dir=weights_dir)
    loaded = backbone.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], saved["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(loaded["blocks.3.0.conv_pw.weight"], saved["blocks.3.0.conv_pw.weight"])
    assert torch.equal(loaded["bn2.running_var"], saved["bn2.running_var"])
    assert backbone.weights_source == str(weights_dir / "efficientnet_lite0_imagenet.pth")
    rgb = create_backbone("efficientnet_lite0", in_chans=3, pretrained=True, weights_dir=weights_dir)
    assert torch.equal(rgb.state_dict()["conv_stem.weight"], saved["conv_stem.weight"])


def test_safetensors_and_name_matching(tmp_path: Path) -> None:
    state = {k: v for k, v in timm.create_model("resnet18").state_dict().items()}
    save_file(state, tmp_path / "resnet18.a1_in1k.safetensors")
    torch.save(state, tmp_path / "resnet18d.pth")  # another architecture: must not match resnet18
    assert find_weights_file("resnet18", tmp_path).name == "resnet18.a1_in1k.safetensors"
    backbone = create_backbone("resnet18", pretrained=True, weights_dir=tmp_path)
    assert torch.equal(backbone.state_dict()["layer4.1.bn2.weight"], state["layer4.1.bn2.weight"])
    torch.save(state, tmp_path / "resnet18_imagenet.pth")
    with pytest.raises(ConfigError, match="several weight files"):
        find_weights_file("resnet18", tmp_path)
    torch.save(state, tmp_path / "resnet18.pth")  # an exact name wins
    assert find_weights_file("resnet18", tmp_path).name == "resnet18.pth"


def test_missing_file_names_the_file_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_weights("efficientnet_lite0", tmp_path)
    assert str(tmp_path / "efficientnet_lite0.pth") in str(err.value)
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_weights("efficientnet_lite0", tmp_path / "nope")
    assert resolve_weights("small_cnn", tmp_path) is None  # project CNNs have no ImageNet weights


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "efficientnet_lite0.pth")
    with pytest.raises(ConfigError, match="do not fit backbone 'efficientnet_lite0'"):
        create_backbone("efficientnet_lite0", pretrained=True, weights_dir=tmp_path)
    (tmp_path / "efficientnet_lite0.pth").write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        create_backbone("efficientnet_lite0", pretrained=True, weights_dir=tmp_path)


def test_offline_hub_fails_at_once_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("must not try to download"))
    with pytest.raises(ConfigError) as err:
        resolve_weights("efficientnet_lite0")
    message = str(err.value)
    assert "efficientnet_lite0.pth" in message and "model.weights_dir" in message
    assert "timm/efficientnet_lite0.ra_in1k" in message


def test_hub_cache_is_used_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    cached = tmp_path / "model.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), cached)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename: str(cached))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = resolve_weights("resnet18")
    assert weights.path == cached and weights.source == "hf-hub:timm/resnet18.a1_in1k"


def test_config_refuses_pretrained_with_only_project_cnns() -> None:
    cfg = {
        "model": {"branches": ["small_cnn", "darknet"], "pretrained": True},
        "fusion": {"name": "average"},
        "optimizer": {"lr": 1e-3},
        "data": {"name": "synthetic", "batch_size": 8, "image_size": 32},
        "trainer": {"max_epochs": 1},
    }
    with pytest.raises(ConfigError, match="no branch"):
        config_checks.validate(cfg)
    cfg["model"] = {"branches": ["small_cnn"], "freeze_backbone_epochs": -1}
    with pytest.raises(ConfigError, match="freeze_backbone_epochs"):
        config_checks.validate(cfg)


def pretrained_pair(weights_dir: Path) -> FusionClassifier:
    """efficientnet_lite0 with the test's ImageNet-style file next to a project CNN without weights."""
    return FusionClassifier(
        ["efficientnet_lite0", "small_cnn"],
        2,
        {"name": "average"},
        image_size=32,
        pretrained=True,
        weights_dir=weights_dir,
    )


def test_per_branch_normalisation_uses_the_weights_stats(weights_dir: Path) -> None:
    model = pretrained_pair(weights_dir)
    assert model.weights_sources["efficientnet_lite0"].endswith("efficientnet_lite0_imagenet.pth")
    assert model.weights_sources["small_cnn"] is None
    assert model.mean.shape == (2, 1, 1, 1) and not model.shared_stats
    assert model.mean[0].item() == pytest.approx(IMAGENET_GREY_MEAN) and model.mean[1].item() == 0.5
    x = torch.full((1, 1, 32, 32), 255, dtype=torch.uint8)
    assert model.preprocess(x, 0)[0, 0, 0, 0].item() == pytest.approx((1 - model.mean[0]) / model.std[0])
    assert model(torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8))["probs"].shape == (2, 2, 2)
    # a checkpoint can be rebuilt offline: same normalisation, no file read
    rebuilt = FusionClassifier(
        ["efficientnet_lite0", "small_cnn"], 2, {"name": "average"}, image_size=32, pretrained=True, load_weights=False
    )
    assert torch.equal(rebuilt.mean, model.mean) and rebuilt.weights_sources["efficientnet_lite0"] is None
    plain = FusionClassifier(["efficientnet_lite0"], 2, {"name": "average"}, image_size=32)
    assert plain.mean.flatten().tolist() == [0.5] and plain.shared_stats


def test_stages_follow_timms_group_matcher() -> None:
    backbone = timm.create_model("efficientnet_lite0", num_classes=0, in_chans=1)
    stages = backbone_stages(backbone)
    assert len(stages) == 8  # stem, 7 block stages (timm merges the head conv into the last)
    assert backbone.conv_stem in stages[0] and backbone.conv_head in stages[-1]
    top = top_stages(backbone, 2)
    assert backbone.conv_head in top and backbone.blocks[5][0].conv_pw in top
    assert backbone.blocks[4][0].conv_pw not in top and backbone.conv_stem not in top
    assert top_stages(backbone, 0) == [] and len(top_stages(backbone, None)) == sum(map(len, stages))
    assert len(backbone_stages(timm.create_model("small_cnn", num_classes=0))) == 6


def _tiny_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (32, 1, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(32) % 2
    x[y == 1, :, 8:16, 8:16] = 250
    return DataLoader(TensorDataset(x, y), batch_size=8)


class Recorder(pl.Callback):
    """Backbone/head snapshots at every epoch end; frozen params' grads and optimizer state in each step."""

    def __init__(self) -> None:
        self.backbone: list[dict[str, torch.Tensor]] = []
        self.head: list[torch.Tensor] = []
        self.frozen_with_grad_or_state: list[str] = []
        self.trainable_per_epoch: dict[int, int] = {}

    @staticmethod
    def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.backbone.append(self.snapshot(pl_module.backbones))
        self.head.append(pl_module.heads["efficientnet_lite0"].weight.detach().clone())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name, p in pl_module.backbones.named_parameters():
            if not p.requires_grad and (p.grad is not None or p in optimizer.state or id(p) in in_optimizer):
                self.frozen_with_grad_or_state.append(name)
        n = sum(p.requires_grad for p in pl_module.backbones.parameters())
        self.trainable_per_epoch[trainer.current_epoch] = n

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.backbone.append(self.snapshot(pl_module.backbones))
        self.head.append(pl_module.heads["efficientnet_lite0"].weight.detach().clone())


def _trainable(branches: tuple[str, ...] = ("efficientnet_lite0",)) -> FusionClassifier:
    return FusionClassifier(
        list(branches),
        2,
        {"name": "concat"},
        image_size=32,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        scheduler=lambda opt, total_steps: torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=total_steps),
    )


def _fit(callbacks: list[pl.Callback], epochs: int = 2, model: FusionClassifier | None = None) -> FusionClassifier:
    model = model or _trainable()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, train_dataloaders=_tiny_loader())
    return model


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def test_freeze_one_epoch_then_unfreeze_with_scaled_lr() -> None:
    recorder = Recorder()
    freeze = BackboneFreeze(freeze_epochs=1, lr_scale=0.25)
    model = _fit([freeze, recorder])
    start, epoch1, epoch2 = recorder.backbone
    assert _changed(start, epoch1) == []  # weights and BatchNorm statistics untouched in epoch 1
    assert not torch.equal(recorder.head[0], recorder.head[1])  # the head did train
    changed = _changed(epoch1, epoch2)
    assert "efficientnet_lite0.conv_stem.weight" in changed and "efficientnet_lite0.bn2.running_mean" in changed
    assert recorder.trainable_per_epoch[0] == 0 and recorder.trainable_per_epoch[1] == len(
        list(model.backbones.parameters())
    )
    assert recorder.frozen_with_grad_or_state == []
    optimizer = model.trainer.optimizers[0]
    heads, backbone = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.25 * heads["lr"]) and backbone["max_lr"] == pytest.approx(0.25 * 1e-2)
    assert all(p in optimizer.state for p in model.backbones.parameters())


def test_trainable_layers_keeps_lower_stages_frozen_all_run() -> None:
    recorder = Recorder()
    model = _fit([BackboneFreeze(trainable_layers=1, lr_scale=0.5), recorder])
    changed = _changed(recorder.backbone[0], recorder.backbone[-1])
    top = tuple(f"efficientnet_lite0.{m}." for m in ("blocks.6", "conv_head", "bn2"))
    assert changed and all(k.startswith(top) for k in changed)
    assert any(k.startswith("efficientnet_lite0.blocks.6.") for k in changed)
    assert recorder.frozen_with_grad_or_state == []
    optimizer = model.trainer.optimizers[0]
    frozen = [p for p in model.backbones.parameters() if not p.requires_grad]
    assert frozen and not any(p in optimizer.state for p in frozen)


def test_freeze_callbacks_from_config(weights_dir: Path) -> None:
    model = pretrained_pair(weights_dir)
    assert freeze_callbacks({"freeze_backbone_epochs": 0, "trainable_layers": None}, model) == []
    (callback,) = freeze_callbacks({"freeze_backbone_epochs": 2, "backbone_lr_scale": 0.1}, model)
    assert callback.freeze_epochs == 2 and callback.keys == ["efficientnet_lite0"]  # the scratch CNN trains
    # what the bf16 timing (model.bf16_branches=auto) is told trains: only trainable_layers freezes for the whole run
    assert trained_top_stages({"trainable_layers": 4}, model) == {"efficientnet_lite0": 4}
    assert trained_top_stages({"freeze_backbone_epochs": 2, "trainable_layers": None}, model) == {}


def test_trainable_layers_per_branch_from_config(weights_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = pretrained_pair(weights_dir)
    lite0_top2 = {"trainable_layers": {"efficientnet_lite0": 2}}
    (callback,) = freeze_callbacks(lite0_top2, model)
    assert callback.keys == ["efficientnet_lite0"] and callback.trainable_layers == {"efficientnet_lite0": 2}
    assert trained_top_stages(lite0_top2, model) == {"efficientnet_lite0": 2}
    assert frozen_for_whole_run(lite0_top2, model, 3) == []
    # a mapping freezes the branches it names, whatever their weights; null for a branch: every stage trains
    (callback,) = freeze_callbacks({"trainable_layers": {"small_cnn": 0, "efficientnet_lite0": None}}, model)
    assert callback.keys == ["small_cnn"] and callback.freeze_epochs == 0
    assert freeze_callbacks({"trainable_layers": {"efficientnet_lite0": None}}, model) == []
    # with freeze_backbone_epochs the pretrained branches it does not name are frozen first, then train every stage
    with caplog.at_level(logging.INFO, logger="xrayfusion.training.finetuning"):
        (callback,) = freeze_callbacks({"freeze_backbone_epochs": 1, "trainable_layers": {"small_cnn": 0}}, model)
    assert callback.trainable_layers == {"efficientnet_lite0": None, "small_cnn": 0}
    assert caplog.messages[-1] == (
        "freezing backbones: frozen all run: ['small_cnn']; "
        "trained after 1 epoch(s) at lr x 0.1, top stages per branch: {'efficientnet_lite0': 'all'}"
    )
    assert trained_top_stages({"freeze_backbone_epochs": 1, "trainable_layers": {"small_cnn": 0}}, model) == {
        "small_cnn": 0
    }
    # what model.feature_cache may cache: pretrained branches that never train
    assert frozen_for_whole_run({"trainable_layers": {"efficientnet_lite0": 0}}, model, 3) == ["efficientnet_lite0"]
    assert frozen_for_whole_run({"trainable_layers": {"small_cnn": 0}}, model, 3) == []
    # a branch key names one copy of a repeated backbone
    twice = FusionClassifier(
        ["efficientnet_lite0", "efficientnet_lite0"],
        2,
        {"name": "average"},
        image_size=32,
        pretrained=True,
        weights_dir=weights_dir,
    )
    second = {"trainable_layers": {"efficientnet_lite0_2": 0}}
    assert [c.keys for c in freeze_callbacks(second, twice)] == [["efficientnet_lite0_2"]]
    assert frozen_for_whole_run(second, twice, 3) == ["efficientnet_lite0_2"]
    assert trained_top_stages({"trainable_layers": {"efficientnet_lite0": 3}}, twice) == {
        "efficientnet_lite0": 3,
        "efficientnet_lite0_2": 3,
    }


def test_parameter_summary_counts_what_trains_all_run(weights_dir: Path) -> None:
    model = pretrained_pair(weights_dir)
    lite0 = sum(p.numel() for p in model.backbones["efficientnet_lite0"].parameters())
    total = sum(p.numel() for p in model.parameters())
    top2 = sum(p.numel() for m in top_stages(model.backbones["efficientnet_lite0"], 2) for p in m.parameters(False))
    assert parameter_summary(model).endswith(f"({total / 1e6:.1f} M parameters, {total / 1e6:.1f} M trainable)")
    frozen = parameter_summary(model, trained_top_stages({"trainable_layers": {"efficientnet_lite0": 0}}, model))
    assert frozen.endswith(f"{(total - lite0) / 1e6:.1f} M trainable)")
    assert parameter_summary(model, {"efficientnet_lite0": 2}).endswith(
        f"{(total - lite0 + top2) / 1e6:.1f} M trainable)"
    )


def test_per_branch_trainable_layers_train_each_branch_as_named() -> None:
    """{small_cnn: 0}: small_cnn's backbone never changes while efficientnet_lite0 trains every stage."""
    recorder = Recorder()
    model = _trainable(("efficientnet_lite0", "small_cnn"))
    callbacks = freeze_callbacks({"trainable_layers": {"small_cnn": 0}}, model)
    _fit([*callbacks, recorder], model=model)
    changed = _changed(recorder.backbone[0], recorder.backbone[-1])
    assert "efficientnet_lite0.conv_stem.weight" in changed and "efficientnet_lite0.bn2.running_mean" in changed
    assert not any(k.startswith("small_cnn.") for k in changed)
    assert recorder.frozen_with_grad_or_state == []
    assert all(p.requires_grad for p in model.backbones["efficientnet_lite0"].parameters())
    assert not any(p.requires_grad for p in model.backbones["small_cnn"].parameters())


def test_the_trained_stages_are_what_backbone_freeze_trains() -> None:
    """freeze_below_top (the bf16 timing's copy) leaves trainable exactly what BackboneFreeze unfreezes."""
    recorder = Recorder()
    model = _fit([BackboneFreeze(trainable_layers=2), recorder])
    trained = {n for n, p in model.backbones.named_parameters() if p.requires_grad}
    copy = create_backbone("efficientnet_lite0", in_chans=1)
    freeze_below_top(copy, 2)
    assert trained and {f"efficientnet_lite0.{n}" for n, p in copy.named_parameters() if p.requires_grad} == trained
    frozen_bn = [m for m in copy.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad]
    assert frozen_bn and not any(m.training for m in frozen_bn)


@pytest.mark.slow
def test_cli_loads_weights_logs_the_file_and_fails_on_empty_dir(
    cli_in_process, tracking_uri: str, weights_dir: Path, tmp_path: Path
) -> None:
    args = ["model=single", "model.branches=[efficientnet_lite0]", "model.pretrained=true"]
    result = cli_in_process(
        [*args, f"model.weights_dir={weights_dir}", "model.freeze_backbone_epochs=1", *SMALL_SYNTHETIC[:-2]]
        + ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("xrayfusion").experiment_id])[0]
    assert run.data.params["weights/efficientnet_lite0"] == str(weights_dir / "efficientnet_lite0_imagenet.pth")
    assert "unfroze" in result.stderr + result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = cli_in_process([*args, f"model.weights_dir={empty}", "data=synthetic"])
    assert failed.returncode == 2 and str(empty / "efficientnet_lite0.pth") in failed.stderr
    assert "Traceback" not in failed.stderr and "Epoch" not in failed.stderr
