"""BiSeNetV2 against the official implementation (CoinCheung/BiSeNet lib/models/bisenetv2.py): parameter counts,
strides of every output, its OHEM loss by hand, trained from scratch (no weights file), and the deploy form's fold
of the BN that comes before a 1x1 conv. tests/test_zoo.py runs every strategy, deploy and ONNX on it."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rtda.config import ConfigError, from_dict, load_config
from rtda.models import build_model, load_trained_weights
from rtda.models.bisenetv2 import BiSeNetV2
from rtda.models.deploy import fold_batchnorm

# CoinCheung/BiSeNet lib/models/bisenetv2.py (HEAD 6b4b67a), BiSeNetV2(19) counted in a scratch folder with
# load_pretrain disabled: aux_mode='train' (with the four booster heads) and aux_mode='eval' (without them)
OFFICIAL_TRAIN_PARAMS, OFFICIAL_EVAL_PARAMS = 5_231_487, 3_358_627


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_the_official_implementation():
    model = build_model({"name": "bisenetv2", "num_classes": 19})
    train, deployed = n_params(model), n_params(model) - n_params(model.aux_heads)
    assert abs(train - OFFICIAL_TRAIN_PARAMS) <= 0.005 * OFFICIAL_TRAIN_PARAMS, train
    assert abs(deployed - OFFICIAL_EVAL_PARAMS) <= 0.005 * OFFICIAL_EVAL_PARAMS, deployed
    assert (train, deployed) == (OFFICIAL_TRAIN_PARAMS, OFFICIAL_EVAL_PARAMS)  # in fact exactly


def test_outputs_at_the_official_strides_for_any_input_size():
    """Main logits at 1/8; booster outputs at half their stage's stride (nearest x2 inside the head); sides that
    are not multiples of 32 round up at each stride-2 layer, and the BGA's two paths meet anyway."""
    torch.manual_seed(0)
    model = BiSeNetV2(num_classes=3).train()
    for h, w in ((64, 64), (72, 88), (33, 47)):
        out = model(torch.randint(0, 256, (2, 3, h, w)).float())
        assert out.logits.shape == (2, 3, math.ceil(h / 8), math.ceil(w / 8))
        # the first aux output is the deepest (multi-level adversarial training reads it): S5 at 1/32, then x2
        assert list(out.aux) == ["aux5_4", "aux4", "aux3", "aux2"]
        for name, stride in (("aux5_4", 32), ("aux4", 16), ("aux3", 8), ("aux2", 4)):
            side = [h, w]
            for _ in range(int(math.log2(stride))):
                side = [math.ceil(s / 2) for s in side]
            assert out.aux[name].shape == (2, 3, 2 * side[0], 2 * side[1]), name
    with pytest.raises(ValueError, match="at least 2 images"):
        model(torch.zeros(1, 3, 64, 64))


def official_ohem(logits: torch.Tensor, label: torch.Tensor, thresh: float = 0.7) -> torch.Tensor:
    """CoinCheung's OhemCELoss (lib/ohem_ce_loss.py), written out on the upsampled logits."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    n_min = int((label != 255).sum()) // 16
    loss = F.cross_entropy(logits, label, ignore_index=255, reduction="none").flatten()
    hard = loss[loss > -torch.log(torch.tensor(thresh, dtype=torch.float))]  # its float32 threshold
    return (hard if hard.numel() >= n_min else loss.topk(n_min).values).mean()


@pytest.mark.parametrize("label_kind", ["random", "easy"])
def test_the_supervised_loss_is_the_official_ohem_sum_of_the_main_and_four_booster_outputs(label_kind):
    """The loss of tools/train_amp.py: OHEM (0.7, a 16th of the labelled pixels) of the main output plus that of
    each booster output, weight 1 each. `easy` labels (the argmax of the main logits where it is confident) make
    fewer than n_min pixels hard, so the min_kept branch is checked too."""
    torch.manual_seed(0)
    model = build_model({"name": "bisenetv2", "num_classes": 4, "ohem_thresh": 0.7, "aux_weight": 1.0}).train()
    output = model(torch.randint(0, 256, (2, 3, 64, 64)).float())
    label = torch.randint(0, 4, (2, 64, 64))
    label[:, :8] = 255
    if label_kind == "easy":
        with torch.no_grad():
            output.logits.mul_(40)  # confident main logits: their argmax is an easy label everywhere
            up = F.interpolate(output.logits, size=(64, 64), mode="bilinear", align_corners=False)
        label = up.argmax(1)
    expected = sum(official_ohem(x, label) for x in (output.logits, *output.aux.values()))
    assert torch.allclose(model.supervised_loss(output, label), expected, rtol=1e-5, atol=1e-6)
    assert model.ohem is not None and model.ohem.min_kept is None


@pytest.mark.parametrize("pretrained", ["imagenet", "/some/backbone_v2.pth"])
def test_bisenetv2_trains_from_scratch_and_any_weights_file_is_one_config_error(pretrained):
    with pytest.raises(ConfigError) as err:
        build_model({"name": "bisenetv2", "pretrained": pretrained})
    message = str(err.value)
    assert "\n" not in message and pretrained in message and "from scratch" in message
    model = build_model({"name": "bisenetv2"})
    assert model.convert_pretrained is None and model.bottleneck_stage is None


def test_param_groups_put_the_two_branches_in_the_backbone_group():
    model = build_model({"name": "bisenetv2"})
    groups = model.param_groups()
    assert sum(p.numel() for p in groups["backbone"]) == n_params(model.backbone.detail) + \
        n_params(model.backbone.segment) - 128  # less the frozen context-embedding BN shift
    assert sum(p.numel() for p in groups["head"]) == n_params(model.bga) + n_params(model.head) + \
        n_params(model.aux_heads)


def test_the_frozen_context_embedding_shift_has_exactly_zero_gradient_when_trainable():
    """Why it is frozen: the conv-BN after it removes any constant it adds, so in the official network, where it
    trains, its gradient is exactly 0 and it stays at its initial 0."""
    torch.manual_seed(0)
    model = BiSeNetV2(num_classes=3).train()
    shift = model.backbone.segment.S5_5.gap[0].bias
    assert not shift.requires_grad and not shift.any()
    shift.requires_grad_(True)
    out = model(torch.randint(0, 256, (2, 3, 64, 64)).float())
    (out.logits.square().mean() + sum(a.square().mean() for a in out.aux.values())).backward()
    assert shift.grad is not None and not shift.grad.any()
    assert model.backbone.segment.S5_5.gap[0].weight.grad.abs().sum() > 0  # its scale does reach the loss


def test_deploy_folds_a_bn_into_the_1x1_conv_after_it():
    torch.manual_seed(0)
    block = nn.Sequential(nn.BatchNorm2d(6), nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU())
    for bn in (block[0], block[2]):
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.data.normal_(), bn.bias.data.normal_()
    block.eval()
    x = torch.randn(3, 6, 4, 4)
    with torch.no_grad():
        expected = block(x)
        fold_batchnorm(block)
        folded = block(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert torch.allclose(folded, expected, atol=1e-5)


@pytest.mark.parametrize("key", ["aux_head", "freeze_bn"])
def test_other_networks_options_are_one_config_error(key):
    with pytest.raises(ConfigError, match=f"model.{key}") as err:
        build_model({"name": "bisenetv2", key: True})
    assert "\n" not in str(err.value)


def test_a_bisenetv2_checkpoint_in_another_config_names_what_it_holds(tmp_path):
    torch.save(build_model({"name": "bisenetv2", "num_classes": 7}).state_dict(), tmp_path / "v2.pt")
    cfg = from_dict({"model": {"name": "bisenetv2", "num_classes": 19}}).model
    with pytest.raises(ConfigError) as err:
        load_trained_weights(build_model(cfg), tmp_path / "v2.pt", cfg)
    message = str(err.value)
    assert "\n" not in message and "holds bisenetv2 with 7 classes" in message, message


RECIPE = {"model.name": "bisenetv2", "model.pretrained": "none", "model.ohem_thresh": 0.7, "model.ohem_min_kept": None,
          "model.aux_weight": 1.0, "train.optimizer": "sgd", "train.lr": 5e-2, "train.momentum": 0.9,
          "train.weight_decay": 5e-4, "train.batch_size": 16, "train.iters": 150_000, "train.poly_power": 0.9,
          "train.warmup_iters": 1000, "train.head_lr_mult": 1.0}
PROTOCOL_CONFIGS = {
    "cityscapes_bisenetv2": {"adapt.name": "none", "data.source.size": [1024, 512], "data.augment.hflip": 0.5,
                             "data.augment.scale_crop": 1.0, "data.augment.scale_range": [0.75, 2.0],
                             "eval.label_size": "full"},
    "gta5_bisenetv2": {"adapt.name": "none", "data.source.size": [1280, 720], "data.augment.scale_crop": 1.0},
    "gta5_bisenetv2_dacs": {"adapt.name": "dacs", "adapt.crop": [512, 512], "data.augment.scale_crop": 0.0},
    "gta5_bisenetv2_daformer_dacs": {"adapt.name": "dacs", "adapt.fd_lambda": 0.0, "data.rcs.enabled": True},
    "gta5_bisenetv2_mic": {"adapt.name": "mic", "adapt.fd_lambda": 0.0, "adapt.mask_ratio": 0.7},
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_CONFIGS))
def test_protocol_configs_carry_the_from_scratch_recipe(name):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    expected = {**RECIPE, **PROTOCOL_CONFIGS[name], "data.val.size": [1024, 512]}
    wrong = {}
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node != value:
            wrong[key] = (node, value)
    assert not wrong, f"{name}: key: (config, recipe) {wrong}"


def test_tables_and_reports_name_it_without_a_resnet():
    from rtda.bench.common import model_label

    assert model_label(from_dict({"model": {"name": "bisenetv2"}}).model) == "BiSeNetV2"
    assert model_label(from_dict({"model": {"name": "bisenet"}}).model) == "BiSeNet-R18"
