"""PIDNet-S/M: parameter counts against the official code, the authors' ImageNet files through the key converter
(from a manifest of their keys and shapes), the edge target and the losses against hand computations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rtda.config import ConfigError
from rtda.models import SegOutput, build_model
from rtda.models.pidnet import balanced_bce, boundary_target

DATA = Path(__file__).parent / "data"

# Counted from XuJiacong/PIDNet models/pidnet.py (19 classes) in a scratch folder: PIDNet(augment=False) for the
# eval network, augment=True for the training one with the P-branch and boundary heads.
OFFICIAL_PARAMS = {"pidnet_s": (7_625_715, 7_720_935), "pidnet_m": (28_538_515, 28_763_111)}


@pytest.mark.parametrize("net", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_equal_the_official_implementation(net):
    model = build_model({"name": net, "num_classes": 19})
    train = sum(p.numel() for p in model.parameters())
    deployed = train - sum(p.numel() for p in model.aux_heads.parameters())
    eval_official, train_official = OFFICIAL_PARAMS[net]
    assert abs(deployed - eval_official) <= 0.005 * eval_official, deployed
    assert abs(train - train_official) <= 0.005 * train_official, train


def authors_file(tmp_path: Path, variant: str) -> Path:
    """A stand-in for PIDNet_<S|M>_ImageNet.pth.tar: every key and shape of the manifest, under 'state_dict'."""
    manifest = json.loads((DATA / f"pidnet_{variant}_imagenet_keys.json").read_text())
    state = {k: torch.zeros(shape, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float)
             for k, shape in manifest["keys"].items()}
    state["layer5.1.conv3.weight"] = torch.arange(state["layer5.1.conv3.weight"].numel(),
                                                  dtype=torch.float).view_as(state["layer5.1.conv3.weight"])
    path = tmp_path / manifest["file"]
    torch.save({"state_dict": state, "epoch": 120}, path)
    return path


@pytest.mark.parametrize("variant", ["s", "m"])
def test_the_authors_imagenet_file_fills_every_backbone_tensor(tmp_path, variant):
    path = authors_file(tmp_path, variant)
    manifest = json.loads((DATA / f"pidnet_{variant}_imagenet_keys.json").read_text())["keys"]
    model = build_model({"name": f"pidnet_{variant}", "num_classes": 19, "pretrained": str(path)})
    backbone = model.backbone.state_dict()
    dropped = {k for k in manifest if k not in backbone}
    assert dropped == {k for k in manifest if k.startswith(("down5.", "last_layer.", "linear."))}  # the classifier
    assert all(tuple(backbone[k].shape) == tuple(manifest[k]) for k in backbone)
    assert len(backbone) == len(manifest) - len(dropped) == 302
    loaded = model.backbone.layer5[1].conv3.weight
    assert torch.equal(loaded.flatten(), torch.arange(loaded.numel(), dtype=torch.float))
    assert not model.backbone.conv1[1].weight.any()  # the BN gammas come from the file (they are built as ones)


def test_a_file_that_is_not_a_pidnet_imagenet_file_is_one_line_naming_what_it_holds(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ConfigError) as error:
        build_model({"name": "pidnet_s", "pretrained": str(path)})
    message = str(error.value)
    assert "\n" not in message and "holds 122 tensors like 'conv1.weight'" in message
    assert "not a PIDNet ImageNet checkpoint" in message
    with pytest.raises(ConfigError, match="mis-shaped backbone tensors for pidnet_s: conv1.0.weight"):
        build_model({"name": "pidnet_s", "pretrained": str(authors_file(tmp_path, "m"))})
    with pytest.raises(ConfigError, match="torchvision has no pidnet_s weights"):
        build_model({"name": "pidnet_s", "pretrained": "imagenet"})


def test_the_edge_target_is_the_official_band_around_a_known_boundary():
    label = torch.zeros(1, 16, 16, dtype=torch.long)
    label[:, :, 8:] = 3
    label[:, :2] = 255  # a boundary within the 6-pixel border: blanked, as the official code blanks it
    expected = torch.zeros(1, 16, 16)
    # thin edge on column 7 (the left pixel of the step), rows 6..9 once the border is blanked; the 4x4 dilation
    # (offsets -2..+1) spreads it over rows 5..11 and columns 6..9: two pixels on each side of the boundary
    expected[:, 5:12, 6:10] = 1
    assert torch.equal(boundary_target(label), expected)


def test_the_edge_target_equals_canny_and_dilate_on_straight_boundaries():
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    label = np.zeros((40, 50), np.uint8)
    label[:, 20:], label[25:, :] = 3, 7
    edge = cv2.Canny(label, 0.1, 0.2)  # datasets/base_dataset.py gen_sample, edge_pad and edge_size = 4
    edge = np.pad(edge[6:-6, 6:-6], ((6, 6), (6, 6)), mode="constant")
    official = (cv2.dilate(edge, np.ones((4, 4), np.uint8), iterations=1) > 50).astype(np.float32)
    ours = boundary_target(torch.from_numpy(label).long()[None])[0].numpy()
    # the two straight boundaries agree everywhere; only the T junction, Canny's one oblique spot, may differ
    differ = np.argwhere(ours != official)
    assert all(abs(y - 25) <= 3 and abs(x - 20) <= 3 for y, x in differ), differ


def test_balanced_bce_weighs_each_side_by_the_share_of_the_other():
    logits = torch.tensor([[[2.0, -1.0, 0.5, 0.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    # 1 positive, 3 negatives: positives weigh 3/4, negatives 1/4; mean over the 4 pixels
    expected = (0.75 * F.softplus(torch.tensor(-2.0)) + 0.25 * (F.softplus(torch.tensor(-1.0))
                + F.softplus(torch.tensor(0.5)) + F.softplus(torch.tensor(0.0)))) / 4
    assert torch.allclose(balanced_bce(logits, target), expected)


def pidnet_output(num_classes: int, boundary_logit: float, size=(16, 16)) -> SegOutput:
    zeros = torch.zeros(1, num_classes, *size)
    return SegOutput(zeros, {"p_branch": zeros.clone(), "boundary": torch.full((1, 1, *size), boundary_logit)})


def test_the_supervised_loss_is_the_official_sum_by_hand():
    C = 4
    model = build_model({"name": "pidnet_s", "num_classes": C, "aux_weight": 0.4, "ohem_thresh": 0.9,
                         "ohem_min_kept": 131072})
    label = torch.zeros(1, 16, 16, dtype=torch.long)
    label[:, :, 8:] = 3
    label[:, :2] = 255
    labelled, n = 14 * 16, 16 * 16
    n_pos = 7 * 4  # the band of test_the_edge_target_is_the_official_band_around_a_known_boundary
    ce = math.log(C)  # uniform logits: every labelled pixel costs log C, and every one is hard for OHEM
    bce = lambda b: n_pos * (n - n_pos) / n ** 2 * (F.softplus(torch.tensor(-b)) + F.softplus(torch.tensor(b)))
    # boundary logit 0: sigmoid 0.5, no pixel passes 0.8, the boundary-aware term is empty (0)
    expected = ce + 0.4 * ce * labelled / n + 20 * bce(0.0)
    assert torch.allclose(model.supervised_loss(pidnet_output(C, 0.0), label), expected)
    # boundary logit 3: sigmoid 0.95 everywhere, the boundary-aware CE covers every labelled pixel
    expected = ce + 0.4 * ce * labelled / n + 20 * bce(3.0) + 1.0 * ce
    assert torch.allclose(model.supervised_loss(pidnet_output(C, 3.0), label), expected)
    # plain CE (model.ohem_thresh null): no pixel past 0.8 makes the boundary-aware term 0, not the NaN of a mean
    # over nothing; with every pixel past it, it is the CE over the labelled ones
    plain = build_model({"name": "pidnet_s", "num_classes": C, "aux_weight": 0.4})
    assert torch.allclose(plain.supervised_loss(pidnet_output(C, 0.0), label), ce + 0.4 * ce * labelled / n
                          + 20 * bce(0.0))
    assert torch.allclose(plain.supervised_loss(pidnet_output(C, 3.0), label), 2 * ce + 0.4 * ce * labelled / n
                          + 20 * bce(3.0))
    # a pseudo-label weight of 0 silences every term, the boundary ones included
    assert model.supervised_loss(pidnet_output(C, 3.0), label, torch.zeros(1, 16, 16)) == 0


def test_any_input_size_and_stride_8():
    model = build_model({"name": "pidnet_s", "num_classes": 3}).train()
    output = model(torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8))
    assert output.logits.shape == (2, 3, 7, 9) and list(output.aux) == ["p_branch", "boundary"]
    assert output.aux["boundary"].shape == (2, 1, 7, 9)
    assert model.eval()(torch.zeros(1, 3, 50, 70)).shape == (1, 3, 50, 70)


def test_the_configs_carry_the_official_recipe():
    """configs/cityscapes/pidnet_{small,medium}_cityscapes.yaml and tools/train.py, through our bases."""
    from rtda.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("cityscapes_pidnet_s", "cityscapes_pidnet_m", "gta5_pidnet_s", "gta5_pidnet_m", "gta5_pidnet_s_dacs"):
        cfg = load_config(configs / f"{name}.yaml")
        model, train = cfg.model, cfg.train
        assert (model.aux_weight, model.ohem_thresh, model.ohem_min_kept) == (0.4, 0.9, 131072), name
        assert model.pretrained.endswith(f"PIDNet_{model.name[-1].upper()}_ImageNet.pth.tar"), name
        assert (train.optimizer, train.lr, train.momentum, train.weight_decay, train.head_lr_mult) == \
            ("sgd", 0.01, 0.9, 5e-4, 1.0), name
        assert (train.batch_size, train.iters, train.poly_power) == (12, 484 * (2975 // 12), 0.9), name
    oracle = load_config(configs / "cityscapes_pidnet_s.yaml").data.augment
    assert (oracle.hflip, oracle.scale_crop, oracle.scale_range) == (0.5, 1.0, [0.5, 2.1])
