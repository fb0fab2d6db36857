"""STDC-Seg (rtda/models/stdc.py): parameter counts against the official code, the detail aggregation targets and
loss against hand computations, the converter from the authors' ImageNet files, the official LR split."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rtda.config import ConfigError
from rtda.models import build_model
from rtda.models.base import SegOutput
from rtda.models.complexity import count_parameters
from rtda.models.losses import segmentation_loss
from rtda.models.stdc import detail_aggregation_loss, detail_targets

DATA = Path(__file__).parent / "data"
# Counted from MichaelFan01/STDC-Seg (models/model_stages.py BiSeNet(backbone, 19, use_boundary_8=True), BN for
# InPlaceABNSync), the parameters the official forward uses (those that get a gradient from all its outputs):
# eval = backbone features + context path + FFM + conv_out; train = eval + conv_out16 + conv_out32 + conv_out_sp8.
OFFICIAL = {"stdc1": {"eval": 8_275_104, "train": 8_572_896}, "stdc2": {"eval": 12_305_568, "train": 12_603_360}}


@pytest.mark.parametrize("net", ["stdc1", "stdc2"])
def test_parameter_counts_equal_the_official_stdc_seg(net):
    model = build_model({"name": net, "num_classes": 19})
    counts = count_parameters(model, torch.zeros(1, 3, 64, 64))
    assert abs(counts["inference"] - OFFICIAL[net]["eval"]) <= 0.005 * OFFICIAL[net]["eval"], counts
    assert abs(counts["total"] - OFFICIAL[net]["train"]) <= 0.005 * OFFICIAL[net]["train"], counts


def test_detail_targets_of_a_vertical_edge_are_the_official_ones():
    """Class 0 left of column 4, class 2 from it. Stride 1: the Laplacian is positive on the higher side of the
    edge (column 4) and, through the zero padding, on the class-2 border pixels (rows 0, 7, column 7). Stride 2
    (centres at even rows/columns, nearest-upsampled in 2x2 cells): columns 4-5 and rows 0-1 of the right half.
    Stride 4 alone weighs 0.1, which does not pass the 0.1 threshold: (2, 6) and (3, 6) stay 0, though its
    upsampled map covers rows 0-3 of the right half."""
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[:, :, 4:] = 2
    expected = torch.zeros(8, 8)
    expected[:, [4, 5, 7]] = 1
    expected[[0, 1, 7], 4:] = 1
    target = detail_targets(label)
    assert target.shape == (1, 1, 8, 8) and target.dtype == torch.float32
    assert torch.equal(target[0, 0], expected)


def test_ignored_regions_have_their_detail_edge_on_their_own_side():
    label = torch.ones(1, 6, 6, dtype=torch.long)
    label[:, :, 3:] = 255  # the official code convolves the raw label: 255 is the higher value
    target = detail_targets(label)[0, 0]
    assert target[2:4, 3].eq(1).all() and target[2:4, 2].eq(0).all()


def test_detail_loss_is_bce_plus_dice_by_hand():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[:, :, 4:] = 2
    n_detail = 27.0  # the expected map above: columns 4, 5, 7 (24) and rows 0, 1, 7 of column 6
    assert detail_targets(label).sum() == n_detail
    logits = torch.zeros(1, 1, 4, 4)  # sigmoid 0.5 everywhere; BCE with logit 0 is log 2 for any target
    bce, dice = detail_aggregation_loss(logits, label, align_corners=True)
    assert bce.item() == pytest.approx(math.log(2))
    assert dice.item() == pytest.approx(1 - (2 * 0.5 * n_detail + 1) / (0.5 * 64 + n_detail + 1))
    # pseudo-labels: weight 0 takes a pixel out of both terms; weight 1 everywhere is the plain loss
    bce0, dice0 = detail_aggregation_loss(logits, label, True, torch.zeros(1, 8, 8))
    assert bce0.item() == 0 and dice0.item() == 0
    bce1, dice1 = detail_aggregation_loss(logits, label, True, torch.ones(1, 8, 8))
    assert torch.allclose(torch.stack([bce1, dice1]), torch.stack([bce, dice]))
    half = torch.ones(1, 8, 8)
    half[:, :, :4] = 0  # only the class-2 half counts: 32 pixels, holding all the detail pixels
    bce_h, dice_h = detail_aggregation_loss(logits, label, True, half)
    assert bce_h.item() == pytest.approx(math.log(2) * 32 / 64)
    assert dice_h.item() == pytest.approx(1 - (2 * 0.5 * n_detail + 1) / (0.5 * 32 + n_detail + 1))


def test_the_supervised_loss_adds_the_detail_terms_to_the_ohem_segmentation_losses():
    torch.manual_seed(0)
    model = build_model({"name": "stdc1", "num_classes": 5, "ohem_thresh": 0.7}).train()
    label = torch.randint(0, 5, (2, 64, 64))
    output = model(torch.randint(0, 256, (2, 3, 64, 64)).float())
    assert list(output.aux) == ["out16", "out32", "detail"] and output.aux["detail"].shape[1] == 1
    classes = {k: v for k, v in output.aux.items() if k != "detail"}
    seg = segmentation_loss(SegOutput(output.logits, classes), label, 1.0, ohem=model.ohem)
    bce, dice = detail_aggregation_loss(output.aux["detail"], label, False)
    assert torch.allclose(model.supervised_loss(output, label), seg + bce + dice)


def test_the_context_path_learns_at_the_backbone_lr_and_the_heads_ten_times_faster():
    model = build_model({"name": "stdc1", "num_classes": 5})
    groups = {k: {id(p) for p in v} for k, v in model.param_groups().items()}
    assert {id(p) for p in model.context_path.parameters()} <= groups["backbone"]
    for head in (model.ffm, model.classifier, *model.aux_heads.values()):
        assert {id(p) for p in head.parameters()} <= groups["head"]


def test_the_bottleneck_stage_is_the_last_1_32_block():
    model = build_model({"name": "stdc2", "num_classes": 5}).eval()
    caught = []
    model.get_submodule(model.bottleneck_stage).register_forward_hook(lambda m, i, o: caught.append(o))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 96))
    assert caught[0].shape == (1, 1024, 2, 3)


def official_imagenet_file(net: str, path: Path) -> Path:
    """Zero tensors under the official STDCNet class's state_dict keys and shapes, nested as the authors' .tar
    (the official init_weight reads torch.load(file)["state_dict"])."""
    manifest = json.loads((DATA / f"{net}_imagenet_keys.json").read_text())
    state = {k: torch.zeros(shape, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
             for k, shape in manifest.items()}
    torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("net", ["stdc1", "stdc2"])
def test_the_authors_imagenet_file_fills_every_backbone_tensor(net, tmp_path):
    path = official_imagenet_file(net, tmp_path / "f.tar")
    model = build_model({"name": net, "num_classes": 5, "pretrained": str(path)})
    backbone = model.backbone.state_dict()
    assert backbone and all(not v.any() for v in backbone.values())  # every tensor came from the (zero) file


def test_a_file_of_another_network_is_one_line_naming_what_it_holds(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError) as err:
        build_model({"name": "stdc1", "pretrained": str(tmp_path / "r18.pth")})
    message = str(err.value)
    assert "\n" not in message and "'conv1.weight'" in message and "STDCNet813" in message
    with pytest.raises(ConfigError, match="not a STDCNet813 ImageNet checkpoint"):
        build_model({"name": "stdc1", "pretrained": str(official_imagenet_file("stdc2", tmp_path / "s2.tar"))})


def test_aux_head_is_a_deeplab_option_and_one_line_for_stdc():
    with pytest.raises(ConfigError, match="model.aux_head is a DeepLabV2 option") as err:
        build_model({"name": "stdc2", "aux_head": True})
    assert "\n" not in str(err.value)
