from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from xrayfusion.core.errors import ConfigError
from xrayfusion.training import config as config_checks

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("fusion", ["concat", "average", "voting", "stacking"])
@pytest.mark.parametrize("data", ["synthetic", "kermany", "medmnist"])
def test_groups_compose(fusion: str, data: str) -> None:
    cfg = compose_train(f"fusion={fusion}", f"data={data}")
    assert cfg.fusion.name == fusion and cfg.data.name == data


def test_experiment_kermany_cpu() -> None:
    cfg = compose_train("experiment=kermany_cpu")
    assert cfg.data.name == "kermany" and list(cfg.model.branches) == ["efficientnet_lite0", "small_cnn"]
    assert cfg.model.pretrained and cfg.fusion.weights == "learned" and cfg.metrics.threshold == "youden"
    assert cfg.data.image_size == 128 and cfg.trainer.max_epochs == 8 and list(cfg.model.bf16_branches) == ["small_cnn"]
    assert dict(cfg.model.branch_sizes) == {"small_cnn": 64} and cfg.fusion.prefer_equal is True
    assert cfg.model.equalize == "hist" and cfg.model.tta == "flips_scales" and cfg.model.tta_each_epoch is False
    assert cfg.data.augment.brightness == 0.3 and cfg.data.augment.degrees == 15.0
    assert cfg.data.augment.hflip == 0.5  # the group default survives the experiment's partial augment block


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.branches=[resnet18,not_a_net]"], "not_a_net"),
        (["fusion=stacking", "model=single"], "at least 2 branches"),
        (["fusion=voting", "model=single"], "at least 2 branches"),
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.lr=-1e-3"], "optimizer.lr"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.name=kermani"], "did you mean kermany"),
        (["model.equalize=clahee"], "model.equalize='clahee' is unknown"),
        (["model.equalize=clahe", "data.image_size=8", "model.clahe.grid=[8,8]"], "needs images larger than 8 px"),
        (["model.mixup.cutmix_alpha=-1"], "model.mixup.cutmix_alpha=-1.0"),
        (["model.ema.decay=1"], "model.ema.decay=1"),
        (["model.tta_each_epoch=sometimes"], "model.tta_each_epoch='sometimes' must be true or false"),
        (["model.trainable_layers=-1"], "model.trainable_layers=-1 must be null"),
        (["model.trainable_layers={resnet50: 0}"], "model.trainable_layers names"),
        (["model.trainable_layers={resnet18: -2}"], "model.trainable_layers.resnet18=-2 must be null"),
        # branch sizes are checked before any image is decoded, with how to replace an experiment's mapping
        (["model.branch_sizes={resnet18: 200}"], "set data.image_size=200"),
        (
            ["experiment=kermany_cpu", "model.branches=[efficientnet_lite0,efficientnet_lite1]"],
            "to replace an experiment's mapping: model.branch_sizes=null",
        ),
        # kermany_cpu names small_cnn in bf16: a model without it is told how to time its own branches instead
        (
            [
                "experiment=kermany_cpu",
                "model.branches=[efficientnet_lite0,resnet18]",
                "model.branch_sizes=null",
                "model.pretrained=false",
            ],
            "list only branches of this model, e.g. 'model.bf16_branches=",
        ),
    ],
)
def test_invalid_configs_fail_before_training(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_checks.validate(compose_train(*overrides))


def test_trainable_layers_per_branch_composes_and_validates() -> None:
    cfg = compose_train("model.trainable_layers={resnet18: 0, mobilenetv2_100: null}")
    config_checks.validate(cfg)
    assert dict(cfg.model.trainable_layers) == {"resnet18": 0, "mobilenetv2_100": None}


def test_validation_builds_no_backbone(monkeypatch) -> None:
    """Names and values are checked without building a backbone; the model checks its input size once."""
    import timm

    from xrayfusion.models import FusionClassifier

    def refuse(*args, **kwargs):
        raise AssertionError("validate built a backbone")

    monkeypatch.setattr(timm, "create_model", refuse)
    config_checks.validate(compose_train("model=single", "model.branches=[densenet121]", "data.image_size=28"))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="densenet121.*data.image_size="):
        FusionClassifier(["densenet121"], 2, {"name": "average"}, image_size=28)
