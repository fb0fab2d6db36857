"""Models: output contract, parameter counts, pretrained loading, frozen BN, deploy form, discriminators."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet101

from rtda.config import ConfigError
from rtda.models import SegOutput, build_model, deploy
from rtda.models.base import CAFFE_BGR_MEAN, InputNorm
from rtda.models.discriminator import build_discriminator
from rtda.models.losses import segmentation_loss
from rtda.models.resnet import resnet_features

BN = nn.modules.batchnorm._BatchNorm
ODD_SIZE = (33, 47)  # not a multiple of 8 or 32


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def bisenet18():
    torch.manual_seed(0)
    return build_model({"name": "bisenet", "backbone": "resnet18", "pretrained": "none"})


@pytest.fixture(scope="module")
def deeplab_aux():
    torch.manual_seed(0)
    return build_model({"name": "deeplabv2", "aux_head": True})


def images(batch=2, size=ODD_SIZE, dtype=torch.uint8):
    return torch.randint(0, 256, (batch, 3, *size), generator=torch.Generator().manual_seed(0)).to(dtype)


# -------------------------------------------------------------------------------------- output contract
# Main logits at 1/8: every stride-2 layer rounds up, and the caffe (v1) max-pool is ceil-mode, which rounds
# up once more where its input side is even. (32, 64) covers sides that divide by 32 on the cheap models.
@pytest.mark.parametrize("cfg, aux_names, stride8", [
    ({"name": "bisenet", "backbone": "resnet18"}, ["context16", "context32"], {ODD_SIZE: (5, 6), (32, 64): (4, 8)}),
    ({"name": "bisenet", "backbone": "resnet101"}, ["context16", "context32"], {ODD_SIZE: (5, 6)}),
    ({"name": "deeplabv2", "aux_head": True, "aspp_dilations": [6, 12], "resnet_variant": "v1",
      "input_norm": "caffe"}, ["layer3"], {ODD_SIZE: (5, 7), (32, 64): (5, 9)}),
])
@torch.no_grad()
def test_output_contract(cfg, aux_names, stride8):
    model = build_model(cfg).train()
    for size, logits_size in stride8.items():
        out = model(images(size=size))
        assert isinstance(out, SegOutput) and list(out.aux) == aux_names
        assert out.logits.shape == (2, 19, *logits_size)
    model.eval()
    for dtype in (torch.uint8, torch.float32):
        logits = model(images(batch=1, dtype=dtype))
        assert isinstance(logits, torch.Tensor) and logits.shape == (1, 19, *ODD_SIZE)
        assert torch.isfinite(logits).all()


def test_bisenet_aux_strides_and_batch_of_one(bisenet18):
    out = bisenet18.train()(images(size=(32, 64)))
    assert out.aux["context16"].shape[-2:] == out.aux["context32"].shape[-2:] == (4, 8)  # both at 1/8
    with pytest.raises(ValueError, match="at least 2 images"):
        bisenet18(images(batch=1))


def _bilinear(x, size):  # the course template's F.interpolate(..., mode="bilinear"): align_corners False
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def test_bisenet_aux_heads_follow_the_course_template_in_two_steps(bisenet18):
    # The template (supervision1/2) classifies the context features upsampled to the spatial path's 1/8, then
    # upsamples the logits to the input size; the one-step path (classify at 1/16 and 1/32, upsample once)
    # is a different function. Odd sizes make the two grids disagree.
    model, x = bisenet18.train(), images(size=ODD_SIZE)
    label = torch.randint(0, 19, (2, *ODD_SIZE), generator=torch.Generator().manual_seed(1))
    out = model(x)
    norm = model.input_norm(x)
    stride8 = model.spatial_path(norm).shape[-2:]
    layer3, layer4 = resnet_features(model.backbone, norm)
    contexts = {"context16": model.arm16(layer3), "context32": model.arm32(layer4) * layer4.mean((2, 3), keepdim=True)}
    for name, context in contexts.items():
        head = model.aux_heads[name]
        two_step = _bilinear(head(_bilinear(context, stride8)), ODD_SIZE)
        one_step = _bilinear(head(context), ODD_SIZE)
        got = _bilinear(out.aux[name], ODD_SIZE)
        assert torch.allclose(got, two_step, atol=1e-5, rtol=1e-5), name
        assert (got - one_step).abs().max() > 1e-2, name
        # the loss makes the second step: its aux term is the template's cross-entropy
        ce = segmentation_loss(SegOutput(out.logits, {name: out.aux[name]}), label, 1.0) - \
            segmentation_loss(SegOutput(out.logits, {}), label, 0.0)
        assert torch.allclose(ce, F.cross_entropy(two_step, label), atol=1e-5), name


def test_input_norm_matches_each_convention():
    pixel = torch.tensor([10.0, 100.0, 200.0]).view(1, 3, 1, 1)  # R, G, B
    caffe = InputNorm("caffe")(pixel).flatten()
    assert torch.allclose(caffe, torch.tensor([200.0, 100.0, 10.0]) - torch.tensor(CAFFE_BGR_MEAN))
    imagenet = InputNorm("imagenet")(pixel.to(torch.uint8)).flatten()
    expected = (pixel.flatten() / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(imagenet, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        InputNorm("imagenet")(torch.zeros(1, 1, 4, 4))


# ------------------------------------------------------------------------------------- parameter counts
def test_parameter_counts_match_the_course_references(bisenet18, deeplab_aux):
    assert count(bisenet18) == 12_068_672  # aux heads included, no torchvision fc
    assert count(deeplab_aux) - count(deeplab_aux.aux_heads) == 43_901_068
    assert count(deeplab_aux.aux_heads) == 4 * (1024 * 19 * 9 + 19)  # the layer3 ASPP


def test_param_groups_split_backbone_and_new_modules(bisenet18):
    groups = bisenet18.param_groups()
    assert sum(p.numel() for p in groups["backbone"]) == sum(p.numel() for p in bisenet18.backbone.parameters())
    assert sum(map(len, groups.values())) == len(list(bisenet18.parameters()))  # BN trained: nothing frozen
    head_ids = {id(p) for p in groups["head"]}
    assert id(bisenet18.ffm.fuse[0].weight) in head_ids and id(bisenet18.spatial_path[0][0].weight) in head_ids


def test_deeplab_backbone_is_dilated_like_deeplab(deeplab_aux):
    backbone = deeplab_aux.backbone
    assert [block.conv2.dilation for block in (backbone.layer3[0], backbone.layer3[1], backbone.layer4[0])] == [
        (2, 2), (2, 2), (4, 4)]
    assert backbone.layer2[0].conv1.stride == (1, 1) and backbone.layer2[0].conv2.stride == (2, 2)
    with torch.no_grad():
        out = deeplab_aux.train()(images())
    assert out.logits.shape == out.aux["layer3"].shape == (2, 19, 5, 6)  # output stride 8 for both heads


# ------------------------------------------------------------------------------------------- frozen BN
def test_frozen_bn_keeps_affine_and_updates_running_stats():
    # the freeze is the same function for both models; BiSeNet-R18 makes the training step cheap
    model = build_model({"name": "bisenet", "freeze_bn": True}).train()
    bn = model.backbone.layer1[0].bn1
    affine_before, mean_before = bn.weight.clone(), bn.running_mean.clone()
    conv_before = model.backbone.layer1[0].conv1.weight.clone()
    groups = model.param_groups()
    trainable = {id(p) for group in groups.values() for p in group}
    assert all(id(m.weight) not in trainable for m in model.backbone.modules() if isinstance(m, BN))
    assert id(model.spatial_path[0][1].weight) in trainable  # new BN layers of the head still train
    optimizer = torch.optim.SGD([{"params": groups["backbone"]}, {"params": groups["head"]}], lr=0.1)
    out = model(images())
    (out.logits.mean() + sum(aux.mean() for aux in out.aux.values())).backward()
    optimizer.step()
    assert bn.training and torch.equal(bn.weight, affine_before) and bn.weight.grad is None
    assert not torch.equal(bn.running_mean, mean_before)
    assert not torch.equal(model.backbone.layer1[0].conv1.weight, conv_before)


def test_freeze_bn_default_follows_the_recipe(bisenet18, deeplab_aux):
    assert not deeplab_aux.backbone.bn1.weight.requires_grad
    assert bisenet18.backbone.bn1.weight.requires_grad
    frozen = build_model({"name": "bisenet", "freeze_bn": True})
    assert not frozen.backbone.bn1.weight.requires_grad and frozen.spatial_path[0][1].weight.requires_grad


# ------------------------------------------------------------------------------------ pretrained weights
def test_torchvision_state_dict_round_trip(tmp_path, capsys):
    torch.manual_seed(1)
    reference = resnet18().state_dict()  # includes fc, which the backbone skips
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    backbone = build_model({"name": "bisenet", "pretrained": str(path)}).backbone.state_dict()
    assert len(backbone) == len(reference) - 2
    assert f"loaded {len(backbone)} backbone tensors from {path}" in capsys.readouterr().out
    for key, value in backbone.items():
        assert torch.equal(value, reference[key]), key


def test_caffe_deeplab_file_round_trip(tmp_path):
    torch.manual_seed(2)
    reference = {k: v for k, v in resnet101().state_dict().items()
                 if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}  # old files lack them
    caffe = {f"Scale.{k}": v for k, v in reference.items()}
    caffe["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(19, 2048, 3, 3)  # the DeepLab classifier: skipped
    path = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(caffe, path)
    model = build_model({"name": "deeplabv2", "pretrained": str(path), "resnet_variant": "v1", "input_norm": "caffe"})
    backbone = model.backbone.state_dict()
    for key, value in reference.items():
        assert torch.equal(backbone[key], value), key
    v1_block = model.backbone.layer2[0]  # caffe ResNet: the stride is in the first 1x1 conv
    assert v1_block.conv1.stride == (2, 2) and v1_block.conv2.stride == (1, 1)
    with pytest.raises(ValueError, match="resnet_variant: v1 and model.input_norm: caffe"):
        build_model({"name": "deeplabv2", "pretrained": str(path)})


@pytest.mark.parametrize("damage, message", [("drop", "1 missing"), ("reshape", "1 mis-shaped"), ("extra", "1 unexpected")])
def test_partial_or_wrong_weights_fail(tmp_path, damage, message):
    state = resnet18().state_dict()
    if damage == "drop":
        del state["layer2.0.conv1.weight"]
    elif damage == "reshape":
        state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    else:
        state["layer9.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"{message} backbone tensors for resnet18: layer"):
        build_model({"name": "bisenet", "pretrained": str(path)})


def test_missing_file_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model({"name": "bisenet", "pretrained": str(tmp_path / "nowhere.pth")})


def test_imagenet_weights_from_the_torch_cache_or_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected_file = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError, match=str(expected_file)):
        build_model({"name": "bisenet", "pretrained": "imagenet"})
    expected_file.parent.mkdir(exist_ok=True)
    torch.manual_seed(3)
    reference = resnet18().state_dict()
    torch.save(reference, expected_file)
    loaded = build_model({"name": "bisenet", "pretrained": "imagenet"}).backbone.conv1.weight
    assert torch.equal(loaded, reference["conv1.weight"])


def test_bad_model_config_names_the_key():
    with pytest.raises(ConfigError, match="model.name"):
        build_model({"name": "segformer"})
    with pytest.raises(ConfigError, match="model.backbnoe"):
        build_model({"name": "bisenet", "backbnoe": "resnet18"})
    with pytest.raises(ValueError, match="aux_head"):
        build_model({"name": "bisenet", "aux_head": True})
    with pytest.raises(ValueError, match="resnet_variant: v1.5 and model.input_norm: imagenet"):
        build_model({"name": "deeplabv2", "pretrained": "imagenet", "input_norm": "caffe"})
    with pytest.raises(ValueError, match="aspp_dilations"):
        build_model({"name": "deeplabv2", "aspp_dilations": []})


# ----------------------------------------------------------------------------------------- deploy form
@pytest.mark.parametrize("model_fixture", ["bisenet18", "deeplab_aux"])
def test_deploy_matches_eager_and_is_inference_only(model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    model.train()
    with torch.no_grad():  # realistic running statistics, so eval-mode activations have a sane scale
        model(images())
    model.eval()
    fast = deploy(model)
    x = images(batch=1)
    with torch.no_grad():
        expected = model(x)
    got = fast(x)
    assert got.shape == expected.shape == (1, 19, *ODD_SIZE)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max().clamp(min=1)
    assert not any(isinstance(m, BN) for m in fast.modules())
    assert any(isinstance(m, BN) for m in model.modules())  # the original is untouched
    assert len(fast.model.aux_heads) == 0 and len(model.aux_heads) > 0
    assert fast.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="eval-only"):
        fast.train()


# -------------------------------------------------------------------------------------- discriminators
def test_discriminators():
    standard, light = build_discriminator("standard", 19), build_discriminator("light", 19)
    assert count(standard) == 19 * 64 * 16 + 64 + 64 * 128 * 16 + 128 + 128 * 256 * 16 + 256 + 256 * 512 * 16 + 512 + 512 * 16 + 1
    assert count(light) * 5 <= count(standard)
    probabilities = torch.softmax(torch.randn(2, 19, 64, 128), dim=1)
    for discriminator in (standard, light):
        assert discriminator(probabilities).shape == (2, 1, 2, 4)
        assert not any(isinstance(m, (BN, nn.Sigmoid)) for m in discriminator.modules())
    with pytest.raises(ValueError, match="'standard', 'light'"):
        build_discriminator("patch", 19)


def test_ohem_keeps_the_hard_pixels_and_at_least_min_kept_of_them():
    from rtda.models.losses import Ohem, pixel_cross_entropy
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 6, 5), generator=g)
    logits = torch.randn(2, 4, 6, 5, generator=g) + 3 * F.one_hot(label, 4).permute(0, 3, 1, 2)
    label[0, :2] = 255
    ce = F.cross_entropy(logits, label, ignore_index=255, reduction="none")[label != 255]
    hard = ce[ce > -math.log(0.7)]
    assert 0 < hard.numel() < ce.numel() - 8  # the case has both kinds of pixels
    assert torch.allclose(pixel_cross_entropy(logits, label, False, ohem=Ohem(0.7, 1)), hard.mean())
    top = ce.sort(descending=True).values[:hard.numel() + 8]  # min_kept above the hard count: the hardest ones
    assert torch.allclose(pixel_cross_entropy(logits, label, False, ohem=Ohem(0.7, hard.numel() + 8)), top.mean())
    assert torch.allclose(pixel_cross_entropy(logits, label, False, ohem=Ohem(0.7, 10_000)), ce.mean())  # all
    assert torch.allclose(pixel_cross_entropy(logits, label, False, ohem=Ohem(1e-6)),  # a 16th of 50 = 3
                          ce.sort(descending=True).values[:3].mean())
