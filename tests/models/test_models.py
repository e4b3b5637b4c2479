import pytest
import timm
import torch

from xrayfusion.core.errors import ConfigError
from xrayfusion.models import FusionClassifier
from xrayfusion.models.backbones import check_backbone_name, check_input_size, create_backbone
from xrayfusion.models.module import branch_entries, branch_input_sizes, branch_keys


@pytest.mark.parametrize(("name", "size"), [("small_cnn", 28), ("darknet", 32)])
def test_project_cnns_live_in_timms_registry(name: str, size: int) -> None:
    model = timm.create_model(name, num_classes=0, in_chans=1)
    assert model(torch.zeros(2, 1, size, size)).shape == (2, model.num_features)
    assert model.forward_features(torch.zeros(2, 1, size, size)).ndim == 4
    head = timm.create_model(name, num_classes=3, in_chans=1)
    assert head(torch.zeros(2, 1, size, size)).shape == (2, 3)


def test_unknown_backbone_names_close_matches() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        check_backbone_name("resnet81")
    check_backbone_name("resnet18.a1_in1k")


def test_too_small_image_names_backbone_and_a_working_size() -> None:
    backbone = create_backbone("densenet121")
    with pytest.raises(ConfigError) as err:
        check_input_size("densenet121", backbone, 1, 28)
    assert "densenet121" in str(err.value) and "data.image_size=32" in str(err.value)
    check_input_size("densenet121", backbone, 1, 32)


def test_branch_keys_are_unique_and_safe() -> None:
    assert branch_keys(["resnet18", "resnet18", "resnet18.a1_in1k", "fused"]) == [
        "resnet18",
        "resnet18_2",
        "resnet18_a1_in1k",
        "fused_2",
    ]


@pytest.mark.parametrize("fusion", ["concat", "average", "voting", "stacking"])
def test_module_forward_and_loss(fusion: str) -> None:
    model = FusionClassifier(
        ["small_cnn", "darknet"], 3, {"name": fusion}, image_size=32, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    x = torch.randint(0, 255, (4, 1, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    out = model(x)
    assert out["probs"].shape == (4, 2, 3) and out["fused_probs"].shape == (4, 3)
    assert torch.allclose(out["fused_probs"].sum(1), torch.ones(4), atol=1e-5)
    assert (out["fused_logits"] is not None) == (fusion == "concat")
    loss = model._loss(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.backbones.parameters() if p.requires_grad)


def test_three_channel_backbone_takes_grey_input() -> None:
    model = FusionClassifier(["small_cnn"], 2, {"name": "average"}, in_chans=3, image_size=32)
    assert model(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))["fused_probs"].shape == (2, 2)


def test_branch_heads_take_the_width_forward_returns() -> None:
    # timm's VGG returns its 4096-wide pre-logits features, wider than its num_features (512)
    model = FusionClassifier(["vgg11", "small_cnn"], 2, {"name": "concat"}, image_size=32)
    out = model(torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8))
    assert model.heads["vgg11"].in_features == 4096
    assert out["probs"].shape == (2, 2, 2) and out["fused_logits"].shape == (2, 2)


def test_tta_flips_averages_each_image_and_its_mirror_in_eval_mode_only(tmp_path) -> None:
    import torch

    from tests.evaluation.test_evaluation import save_checkpoint
    from xrayfusion.evaluation.loading import load_classifier

    torch.manual_seed(0)
    plain = FusionClassifier(["small_cnn", "darknet"], 2, {"name": "average"}, image_size=32).eval()
    tta = FusionClassifier(**{**plain.hparams, "tta": "flips"})
    tta.load_state_dict(plain.state_dict())
    tta.eval()
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = (plain(x)["fused_probs"] + plain(torch.flip(x, dims=[-1]))["fused_probs"]) / 2
        assert torch.allclose(tta(x)["fused_probs"], expected, atol=1e-6)
        assert not torch.allclose(tta(x)["fused_probs"], plain(x)["fused_probs"])  # it does change the answer
        tta.train()
        assert torch.equal(tta(x)["logits"], plain.train()(x)["logits"])  # training steps never see it
    loaded = load_classifier(save_checkpoint(tta.eval(), tmp_path / "best.ckpt"))
    assert loaded.hparams.tta == "flips"  # evaluate, predict and the served model use it too
    with pytest.raises(ConfigError, match="model.tta='rotate'"):
        FusionClassifier(["small_cnn"], 2, {"name": "average"}, tta="rotate")


def test_tta_scales_average_each_branch_at_every_scale(tmp_path) -> None:
    import torch
    import torch.nn.functional as F

    from tests.evaluation.test_evaluation import save_checkpoint
    from xrayfusion.evaluation.loading import load_classifier

    torch.manual_seed(0)
    plain = FusionClassifier(["small_cnn", "darknet"], 2, {"name": "average"}, image_size=32).eval()
    tta = FusionClassifier(**{**plain.hparams, "tta": "scales", "tta_scales": [1.5, 1.25]}).eval()
    tta.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    expected = []
    with torch.no_grad():
        for size in (32, 48, 40):  # the same weights fed the images resized beforehand, at every scale
            at = FusionClassifier(**{**plain.hparams, "image_size": size}).eval()
            at.load_state_dict(plain.state_dict())
            resized = F.interpolate(x.float() / 255, size=(size, size), mode="bilinear", antialias=True)
            expected.append(at(resized)["fused_probs"])
        assert torch.allclose(tta(x)["fused_probs"], torch.stack(expected).mean(0), atol=1e-5)
        assert torch.equal(tta(x)["logits"], plain(x)["logits"])  # logits: the plain view (what calibration fits)
        assert not torch.allclose(tta(x)["fused_probs"], plain(x)["fused_probs"])
        both = FusionClassifier(**{**tta.hparams, "tta": "flips_scales"}).eval()
        both.load_state_dict(plain.state_dict())
        flipped = torch.flip(x, dims=[-1])
        assert torch.allclose(
            both(x)["fused_probs"], (tta(x)["fused_probs"] + tta(flipped)["fused_probs"]) / 2, atol=1e-6
        )
    loaded = load_classifier(save_checkpoint(tta, tmp_path / "best.ckpt"))
    assert loaded.hparams.tta == "scales" and [v.scale for v in loaded.views] == [1.0, 1.5, 1.25]
    with pytest.raises(ConfigError, match=r"'darknet' cannot take the 24x24 px inputs model.tta_scales=\[0.75\]"):
        FusionClassifier(["darknet"], 2, {"name": "average"}, image_size=32, tta="scales", tta_scales=[0.75])
    with pytest.raises(ConfigError, match="repeat a size"):  # 1.01 x 32 px is 32 px: the plain view twice
        FusionClassifier(["small_cnn"], 2, {"name": "average"}, image_size=32, tta="scales", tta_scales=[1.01])
    bad = ([1.0], [], ["big"], [9], 0.9, [1.25, 1.25], [True])
    for scales, match in zip(
        bad, ("not 1", "must list", "must list", "between 0.25", "0.9", "distinct", "True"), strict=True
    ):
        with pytest.raises(ConfigError, match=match):
            FusionClassifier(["small_cnn"], 2, {"name": "average"}, tta="scales", tta_scales=scales)


def test_each_branch_runs_at_its_own_input_size() -> None:
    model = FusionClassifier(
        branches=["small_cnn", "darknet"],
        num_classes=2,
        fusion={"name": "concat"},
        image_size=48,
        branch_sizes={"small_cnn": 32},
    ).eval()
    assert model.sizes == [32, 48]
    seen = {}
    for key, backbone in model.backbones.items():
        backbone.register_forward_pre_hook(lambda m, args, key=key: seen.__setitem__(key, tuple(args[0].shape)))
    images = torch.randint(0, 256, (3, 1, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert seen == {"small_cnn": (3, 1, 32, 32), "darknet": (3, 1, 48, 48)}
    expected = torch.nn.functional.interpolate(
        model.preprocess(images), size=(32, 32), mode="bilinear", antialias=True, align_corners=False
    )
    torch.testing.assert_close(model.branch_input(images, 0), expected)
    assert out["fused_probs"].shape == (3, 2)
    with pytest.raises(ConfigError, match="set data.image_size=64"):
        FusionClassifier(
            branches=["small_cnn"],
            num_classes=2,
            fusion={"name": "average"},
            image_size=48,
            branch_sizes={"small_cnn": 64},
        )
    with pytest.raises(ConfigError, match="not in model.branches"):
        FusionClassifier(
            branches=["small_cnn"],
            num_classes=2,
            fusion={"name": "average"},
            image_size=48,
            branch_sizes={"resnet18": 32},
        )


def test_branch_sizes_by_name_apply_to_every_copy_and_by_key_to_one() -> None:
    twice = ["small_cnn", "small_cnn", "darknet"]
    assert branch_input_sizes(twice, 64, {"small_cnn": 32}) == [32, 32, 64]
    assert branch_input_sizes(twice, 64, {"small_cnn_2": 48}) == [64, 48, 64]
    assert branch_input_sizes(twice, 64, {"small_cnn": 32, "small_cnn_2": 48}) == [32, 48, 64]
    assert branch_entries("trainable_layers", twice, {"small_cnn_2": 0, "darknet": None}) == {1: 0, 2: None}
    with pytest.raises(ConfigError, match=r"names \['small_cnn_3'\].*or branch keys \['small_cnn_2'\]"):
        branch_input_sizes(twice, 64, {"small_cnn_3": 32})
