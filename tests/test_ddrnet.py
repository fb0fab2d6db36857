"""DDRNet-23-slim and DDRNet-23: parameter counts against the official code, the authors' ImageNet files through the
key converter, the two-head OHEM loss against HRNet's OhemCrossEntropy computed by hand, the training-only head.

The official counts come from ydhongHIT/DDRNet `segmentation/DDRNet_23_slim.py` and `DDRNet_23.py` (DualResNet,
19 classes, augment=False for the eval network, True for the training one with `seghead_extra`), counted in a
scratch folder (docs/models.md). The manifests in tests/data are the state_dict key names and shapes of the
official classification models (`classification/DDRNet_23_slim.py`, `DDRNet_23.py`, `get_model()`), no weights.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from rtda.config import ConfigError, from_dict
from rtda.models import build_model, deploy
from rtda.models.deploy import ChannelAffine

DATA = Path(__file__).parent / "data"
# (eval network, training network with the auxiliary head), counted from the official segmentation code
OFFICIAL_PARAMS = {"ddrnet23_slim": (5_695_987, 5_734_342), "ddrnet23": (20_148_947, 20_299_366)}
NETS = sorted(OFFICIAL_PARAMS)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("net", NETS)
def test_parameter_counts_equal_the_official_models(net):
    model = build_model({"name": net, "num_classes": 19})
    official_eval, official_train = OFFICIAL_PARAMS[net]
    ours_train, ours_eval = count(model), count(model) - count(model.aux_heads)
    assert abs(ours_eval - official_eval) <= 0.005 * official_eval, (ours_eval, official_eval)
    assert abs(ours_train - official_train) <= 0.005 * official_train, (ours_train, official_train)


def authors_file(net: str, path: Path, layout: str = "flat") -> dict:
    """Zero tensors under the official classification model's key names and shapes, saved as the authors' file:
    `flat` (what DDRNet.pytorch loads) or `nested` (`state_dict` of a DataParallel model, the layout the official
    segmentation code's commented-out loader strips)."""
    manifest = json.loads((DATA / f"{net}_imagenet_keys.json").read_text())
    state = {k: torch.zeros(shape, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
             for k, shape in manifest.items()}
    saved = state if layout == "flat" else {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(saved, path)
    return state


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("net", NETS)
def test_the_authors_imagenet_file_fills_every_backbone_tensor(net, layout, tmp_path):
    path = tmp_path / f"{net}_imagenet.pth"
    state = authors_file(net, path, layout)
    model = build_model({"name": net, "num_classes": 5, "pretrained": str(path)})
    backbone = model.backbone.state_dict()
    classifier = [k for k in state if k.startswith(("down5.", "last_layer.", "linear."))]
    assert classifier and set(backbone) == set(state) - set(classifier)  # every key mapped, none missing
    assert all(backbone[k].shape == state[k].shape for k in backbone)
    assert all(not v.any() for v in backbone.values())  # the zeros arrived (the initialisation is not zero)
    assert count(model.spp) and any(p.any() for p in model.spp.parameters())  # DAPPM is not in the file


@pytest.mark.parametrize("net", NETS)
def test_a_file_of_other_weights_is_one_line_naming_what_it_holds(net, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build_model({"name": net, "pretrained": str(path)})
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "122 tensors like 'conv1.weight'" in message
    assert "not a DDRNet ImageNet checkpoint" in message


def test_a_segmentation_checkpoint_is_named_as_such(tmp_path):
    """The authors' Cityscapes-trained files hold the backbone, DAPPM (spp.*) and heads, not the ImageNet tail."""
    path = tmp_path / "best_val_smaller.pth"
    state = authors_file("ddrnet23_slim", path)
    state = {k: v for k, v in state.items() if not k.startswith(("down5.", "last_layer.", "linear."))}
    torch.save({**state, "spp.scale0.2.weight": torch.zeros(128, 512, 1, 1)}, path)
    with pytest.raises(ConfigError, match=r"\(a segmentation model's: it has spp\.\*\), which is not a DDRNet Im"):
        build_model({"name": "ddrnet23_slim", "pretrained": str(path)})


def test_the_other_variants_file_is_refused_by_shape(tmp_path):
    path = tmp_path / "DDRNet23_imagenet.pth"
    authors_file("ddrnet23", path)
    with pytest.raises(ConfigError, match="mis-shaped backbone tensors"):
        build_model({"name": "ddrnet23_slim", "pretrained": str(path)})


def hrnet_ohem(logits: torch.Tensor, label: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """HRNet's OhemCrossEntropy (which DDRNet trains with), written out: sort the labelled pixels by the
    probability of their label, threshold = max(the min_kept-th smallest, thresh), mean CE of those below it."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, label, ignore_index=255, reduction="none").flatten()
    prob = logits.softmax(1).gather(1, label.clamp(max=logits.shape[1] - 1).unsqueeze(1)).flatten()
    labelled = label.flatten() != 255
    prob, ce = prob[labelled], ce[labelled]
    order = prob.argsort()
    threshold = max(prob[order][min(min_kept, prob.numel() - 1)].item(), thresh)
    return ce[prob < threshold].mean()


def test_the_loss_is_ohem_on_the_main_and_0_4_times_ohem_on_the_stage3_head():
    torch.manual_seed(0)
    model = build_model({"name": "ddrnet23_slim", "num_classes": 4, "aux_weight": 0.4,
                         "ohem_thresh": 0.3, "ohem_min_kept": 100}).train()
    label = torch.randint(0, 4, (2, 32, 48))
    label[:, :3] = 255
    output = model(torch.randint(0, 256, (2, 3, 32, 48)).float())
    assert list(output.aux) == ["stage3"] and output.logits.shape == output.aux["stage3"].shape == (2, 4, 4, 6)
    expected = (hrnet_ohem(output.logits, label, 0.3, 100)
                + 0.4 * hrnet_ohem(output.aux["stage3"], label, 0.3, 100))
    assert torch.allclose(model.supervised_loss(output, label), expected, atol=1e-5)
    # DACS/MIC's pixel-weighted pseudo-labels: the weighted CE of both heads (OHEM is for true labels)
    weight = torch.rand(2, 32, 48)
    weighted = sum(w * (F.cross_entropy(F.interpolate(x, size=(32, 48), mode="bilinear"), label,
                                        ignore_index=255, reduction="none") * weight).mean()
                   for w, x in ((1.0, output.logits), (0.4, output.aux["stage3"])))
    assert torch.allclose(model.supervised_loss(output, label, weight), weighted, atol=1e-5)


def test_eval_runs_no_auxiliary_head_and_the_deploy_form_keeps_no_batchnorm():
    model = build_model({"name": "ddrnet23_slim", "num_classes": 3}).eval()
    called = []
    model.aux_heads["stage3"].register_forward_hook(lambda *args: called.append(1))
    image = torch.randint(0, 256, (1, 3, 40, 56)).float()
    with torch.no_grad():
        logits, aux = model.forward_logits(model.input_norm(image), with_aux=False)
    assert aux == {} and not called and logits.shape == (1, 3, 5, 7)
    fast = deploy(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    assert any(isinstance(m, ChannelAffine) for m in fast.modules())  # DAPPM's and the head's pre-activation BN


def test_a_batchnorm_with_no_conv_before_it_becomes_its_affine_in_any_bn_kind():
    torch.manual_seed(0)
    for bn, shape in ((torch.nn.BatchNorm2d(3), (2, 3, 4, 5)), (torch.nn.SyncBatchNorm(3), (2, 3, 4, 5)),
                      (torch.nn.BatchNorm1d(3, affine=False), (2, 3))):
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        if bn.affine:
            bn.weight.data.normal_(), bn.bias.data.normal_()
        x = torch.randn(shape)
        assert torch.allclose(ChannelAffine(bn.eval())(x), bn(x), atol=1e-6), type(bn).__name__


def test_a_trained_checkpoint_of_the_other_variant_is_named_in_the_error(tmp_path):
    from rtda.models import load_trained_weights

    path = tmp_path / "last.pt"
    torch.save(build_model({"name": "ddrnet23_slim", "num_classes": 5}).state_dict(), path)
    with pytest.raises(ConfigError, match=r"holds ddrnet23_slim with 5 classes, but the config builds ddrnet23 with "
                                          r"19 classes"):
        load_trained_weights(build_model({"name": "ddrnet23"}), path, from_dict({"model": {"name": "ddrnet23"}}).model)


def test_benchmarks_label_the_network_by_its_own_name():
    from rtda.bench.common import model_label

    for net, label in (("ddrnet23_slim", "DDRNet-23-slim"), ("ddrnet23", "DDRNet-23")):
        assert model_label(from_dict({"model": {"name": net}}).model) == label  # not 'ddrnet23_slim-R18'


def test_a_training_batch_of_one_image_is_one_line():
    model = build_model({"name": "ddrnet23_slim", "num_classes": 3}).train()
    with pytest.raises(ValueError, match="ddrnet23_slim trains on batches of at least 2 images"):
        model(torch.zeros(1, 3, 64, 64))


# our key -> the official segmentation model's (segmentation/DDRNet_23*.py `DualResNet`)
_OFFICIAL_HEAD = {"0": "bn1", "2": "conv1", "3": "bn2", "5": "conv2"}


def official_key(key: str) -> str:
    top, rest = key.split(".", 1)
    if top == "backbone":
        return rest
    if top == "head":
        index, tail = rest.split(".", 1)
        return f"final_layer.{_OFFICIAL_HEAD[index]}.{tail}"
    if top == "aux_heads":
        _, index, tail = rest.split(".", 2)
        return f"seghead_extra.{_OFFICIAL_HEAD[index]}.{tail}"
    return key  # spp.*


def official_fill(key: str, like: torch.Tensor) -> torch.Tensor:
    """The weights the reference logits were computed with: a generator seeded by the official key's crc32."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if not like.dtype.is_floating_point:
        return like
    if key.endswith("running_var"):
        return torch.rand(like.shape, generator=g) + 0.5
    if like.dim() == 4:
        return torch.randn(like.shape, generator=g) / like[0].numel() ** 0.5
    if key.endswith(".weight"):
        return 1 + 0.1 * torch.randn(like.shape, generator=g)
    return 0.1 * torch.randn(like.shape, generator=g)


@pytest.mark.parametrize("net", NETS)
def test_the_same_weights_give_the_official_models_logits(net):
    """tests/data/<net>_official_logits.json: the official DualResNet (19 classes, augment=True, eval) run in a
    scratch folder on randn(1, 3, 64, 128) (seed 0) with `official_fill` weights: mean, std and six logits of its
    main and seghead_extra outputs."""
    reference = json.loads((DATA / f"{net}_official_logits.json").read_text())
    model = build_model({"name": net}).eval()
    model.load_state_dict({k: official_fill(official_key(k), v) for k, v in model.state_dict().items()})
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, aux = model.forward_logits(x, with_aux=True)
    for out, ref in ((logits[0], reference["main"]), (aux["stage3"][0], reference["stage3"])):
        assert out.shape == (19, 8, 16)
        assert abs(out.mean().item() - ref["mean"]) < 1e-4 and abs(out.std().item() - ref["std"]) < 1e-4
        assert all(abs(out[c, y, x_].item() - value) < 1e-4 for c, y, x_, value in ref["samples"])
