"""The state-of-the-art self-training ingredients (issue 13): ADVENT's MinEnt and AdvEnt, DAFormer's options of DACS
(rare class sampling, thing-class ImageNet feature distance, pseudo-label row crop), MIC's masked image consistency.

Each loss and mask on hand-made tensors against its paper's definition, where each gradient goes, resume exactness
of every new strategy through train.py, and every new config for two iterations on the tiny synthetic domains."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rtda import adapt
from rtda.config import ConfigError, from_dict, load_config
from rtda.datasets import build_dataset, rare_class
from rtda.datasets.io import read_label_png
from rtda.datasets.labels import ID_TO_TRAIN_ID

from conftest import save_palettised, save_png, straight_and_resumed, tiny_overrides
from test_adapt import C, FakeContext, TinyNet, batches, make_cfg

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "configs" / "synthetic"
NEW_SYNTHETIC = ["gta5_bisenet_minent", "gta5_bisenet_advent", "gta5_bisenet_daformer_dacs", "gta5_bisenet_mic"]
NEW_PROTOCOL = [f"gta5_{m}_{s}" for m in ("bisenet", "deeplabv2") for s in ("minent", "advent", "daformer_dacs", "mic")]


# ----------------------------------------------------------------------------------------------- ADVENT
def test_self_information_and_entropy_maps_on_hand_made_probabilities():
    probs = torch.zeros(1, 4, 1, 3)
    probs[0, :, 0, 0] = 0.25                          # uniform: each class 1/4 of the entropy, entropy 1
    probs[0, 2, 0, 1] = 1.0                           # certain: 0 everywhere (0 log 0 = 0)
    probs[0, :2, 0, 2] = torch.tensor([0.5, 0.5])     # two classes of four: entropy 1 bit of 2
    info = adapt.losses.self_information(probs)
    assert torch.allclose(info[0, :, 0, 0], torch.full((4,), 0.25))
    assert torch.equal(info[0, :, 0, 1], torch.zeros(4))
    assert torch.allclose(info[0, :, 0, 2], torch.tensor([0.25, 0.25, 0.0, 0.0]))
    assert torch.allclose(adapt.losses.entropy_map(probs), torch.tensor([[[1.0, 0.0, 0.5]]]))
    # ADVENT's entropy_loss: -sum(p log2 p) / (N H W log2 C) is the mean of the entropy map
    p = torch.randn(2, C, 5, 7).softmax(1)
    advent_loss = -(p * torch.log2(p + 1e-30)).sum() / (2 * 5 * 7 * math.log2(C))
    assert torch.allclose(adapt.losses.entropy_map(p).mean(), advent_loss)
    assert torch.allclose(adapt.losses.self_information(p), -p * torch.log2(p + 1e-30) / math.log2(C))


@pytest.mark.parametrize("multi_level", [True, False])
def test_minent_losses_and_their_reach(multi_level):
    torch.manual_seed(0)
    model = TinyNet()
    strategy = adapt.build_strategy(make_cfg("minent", multi_level=multi_level), model)
    source, target = batches(h=16, w=32)
    frozen = copy.deepcopy(model)
    ctx = FakeContext(watch={"model": model})
    losses = strategy.training_step(model, source, target, ctx)
    assert set(losses) == ({"seg", "ent_main", "ent_aux"} if multi_level else {"seg", "ent_main"})
    assert ctx.reached == [{"model"}, {"model"}] and all(not v.requires_grad for v in losses.values())
    with torch.no_grad():
        out = frozen(target["image"])
        levels = {"main": out.logits, "aux": out.aux["aux"]} if multi_level else {"main": out.logits}
        for level, logits in levels.items():
            p = F.interpolate(logits, size=(16, 32), mode="bilinear", align_corners=False).softmax(1)
            expected = -(p * torch.log2(p + 1e-30)).sum() / (2 * 16 * 32 * math.log2(C))  # ADVENT's entropy_loss
            assert torch.allclose(losses[f"ent_{level}"], expected, atol=1e-6)


def test_minent_multi_level_deeplab_needs_the_aux_head():
    cfg = from_dict({"model": {"name": "deeplabv2"}, "adapt": {"name": "minent", "multi_level": True}})
    with pytest.raises(ValueError, match="model.aux_head"):
        adapt.build_strategy(cfg, TinyNet())
    with pytest.raises(ValueError, match="adapt.lambda_ent = -1"):
        adapt.build_strategy(make_cfg("minent", lambda_ent=-1.0), TinyNet())


def test_advent_discriminators_see_self_information_and_losses_reach_their_network():
    torch.manual_seed(0)
    model = TinyNet()
    strategy = adapt.build_strategy(make_cfg("advent", multi_level=True), model)
    source, target = batches(h=64, w=64)
    frozen_model, frozen_d = copy.deepcopy(model), copy.deepcopy(strategy.discriminators)
    seen = []
    strategy.discriminators["main"].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    ctx = FakeContext(watch={"model": model, "disc": strategy.discriminators})
    losses = strategy.training_step(model, source, target, ctx)
    assert ctx.reached == [{"model"}, {"model"}, {"disc"}]  # seg, adversarial: the model; D loss: the D only

    def info(out, level):
        logits = out.logits if level == "main" else out.aux["aux"]
        p = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False).softmax(1)
        return -p * torch.log2(p + 1e-30) / math.log2(C)  # ADVENT's prob_2_entropy

    with torch.no_grad():
        out_s, out_t = frozen_model(source["image"]), frozen_model(target["image"])
        assert torch.allclose(seen[0], info(out_t, "main"), atol=1e-6)  # generator step: target maps
        assert torch.allclose(seen[1], info(out_s, "main"), atol=1e-6)  # discriminator step: source, then target
        expected_d = 0.0
        for level in ("main", "aux"):
            d_t, d_s = frozen_d[level](info(out_t, level)), frozen_d[level](info(out_s, level))
            bce = F.binary_cross_entropy_with_logits
            assert torch.allclose(losses[f"adv_{level}"], bce(d_t, torch.zeros_like(d_t)), atol=1e-5)
            expected_d += 0.5 * bce(d_s, torch.zeros_like(d_s)) + 0.5 * bce(d_t, torch.ones_like(d_t))
    assert torch.allclose(losses["disc"], expected_d, atol=1e-5)
    assert (seen[0].sum(1) <= 1 + 1e-6).all() and (seen[0] >= 0).all()  # a normalised entropy, class by class


# --------------------------------------------------------------------------------------------- DAFormer
def test_protocol_rows_and_pseudo_weight_map():
    assert [adapt.daformer.protocol_pixels(v, 512) for v in (15, 120, 64)] == [15, 120, 64]
    assert [adapt.daformer.protocol_pixels(v, 128) for v in (15, 120, 64)] == [4, 30, 16]  # synthetic 256x128
    assert [adapt.daformer.protocol_pixels(v, 1024) for v in (15, 120, 64)] == [30, 240, 128]  # full-resolution Cityscapes
    weight = adapt.daformer.pseudo_weight_map(torch.tensor(0.6), (2, 10, 3), 2, 3)
    expected = torch.full((2, 10, 3), 0.6)
    expected[:, :2] = 0
    expected[:, 7:] = 0
    assert torch.equal(weight, expected)
    assert torch.equal(adapt.daformer.pseudo_weight_map(torch.tensor(0.6), (1, 4, 2), 0, 0), torch.full((1, 4, 2), 0.6))


def record_weighted_losses(monkeypatch, seen: list) -> None:
    """Record (label, weight) of each pixel-weighted segmentation loss that DACS and MIC compute."""
    real = adapt.losses.segmentation_loss

    def recording(model, out, label, weight=None):
        if weight is not None:
            seen.append((label, weight))
        return real(model, out, label, weight)

    for module in (adapt.dacs, adapt.mic):
        monkeypatch.setattr(module, "segmentation_loss", recording)


def test_dacs_zeroes_the_target_weight_in_the_ignored_rows(monkeypatch):
    seen = []
    record_weighted_losses(monkeypatch, seen)
    model = TinyNet()
    # target 16 rows high: 64 / 128 rows of a 512-row target are 2 / 4 rows here
    strategy = adapt.build_strategy(make_cfg("dacs", pseudo_ignore_top=64, pseudo_ignore_bottom=128), model)
    assert strategy.ignore_rows == (2, 4)
    source, target = batches()
    masks = []
    class_mix = adapt.mixing.class_mix_masks
    monkeypatch.setattr(adapt.mixing, "class_mix_masks", lambda *a: masks.append(class_mix(*a)) or masks[-1])
    losses = strategy.training_step(model, source, target, FakeContext())
    (_, weight), mask = seen[0], masks[0]
    target_part = ~mask
    rows = torch.arange(16)[None, :, None].expand_as(mask)
    ignored = (rows < 2) | (rows >= 12)
    assert (weight[target_part & ignored] == 0).all()
    assert torch.allclose(weight[target_part & ~ignored], losses["pseudo_weight"].expand(int((target_part & ~ignored).sum())))
    assert (weight[mask] == 1).all()  # source pixels keep weight 1, in every row
    with pytest.raises(ValueError, match="adapt.pseudo_ignore_top"):
        adapt.build_strategy(make_cfg("dacs", pseudo_ignore_top=256, pseudo_ignore_bottom=256), model)


def test_fd_class_mask_on_a_hand_made_label():
    # 8x12 label -> 2x3 feature cells of 4x4 pixels; thing classes 11 (person) and 13 (car)
    label = torch.zeros(1, 8, 12, dtype=torch.long)  # road (a stuff class) by default
    label[0, :4, :4] = 13                          # cell (0, 0): all car -> kept
    label[0, :4, 4:8] = 13
    label[0, 3, 4:8] = 0                           # cell (0, 1): 12/16 car = 0.75 -> kept (>= min ratio)
    label[0, :4, 8:12] = 11
    label[0, :2, 8:12] = 255                       # cell (0, 2): 8/16 person, 8/16 ignore -> below 0.75
    label[0, 4:8, :4] = 13
    label[0, 4:8, 2:4] = 0                         # cell (1, 0): 8/16 car -> 0.5 < 0.75: not kept
    label[0, 4:8, 4:8] = 255                       # cell (1, 1): all ignore -> never kept
    label[0, 4:8, 8:12] = 11
    label[0, 7, 8:12] = 255                        # cell (1, 2): 12/16 person with 4/16 ignore -> kept
    things = torch.tensor([11, 13])
    mask = adapt.daformer.fd_class_mask(label, (2, 3), things, 0.75, 19)
    assert mask.tolist() == [[[True, True, False], [False, False, True]]]
    # the same through DAFormer's recipe: one-hot (ignore as class 19), 4x4 average pool, majority and its share
    one_hot = F.one_hot(torch.where(label == 255, 19, label), 20).permute(0, 3, 1, 2).float()
    ratio, majority = F.avg_pool2d(one_hot, 4).max(1)
    assert torch.equal(mask, (ratio >= 0.75) & torch.isin(majority, things))
    assert adapt.daformer.fd_class_mask(label[:, :7, :11], (2, 3), things, 0.75, 19).shape == (1, 2, 3)  # not a multiple


def test_feature_distance_is_the_mean_l2_over_masked_cells():
    f1, f2 = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)
    mask = torch.rand(2, 3, 4) > 0.5
    expected = (f1 - f2).pow(2).sum(1).sqrt()[mask].mean()
    assert torch.allclose(adapt.daformer.feature_distance(f1, f2, mask), expected)
    assert adapt.daformer.feature_distance(f1, f2, torch.zeros(2, 3, 4, dtype=torch.bool)) == 0  # DAFormer: NaN


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """A stand-in for ImageNet weights: a random ResNet-18 backbone in torchvision's key names."""
    from rtda.models.resnet import build_resnet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(build_resnet("resnet18").state_dict(), path)
    return path


def bisenet_dacs_cfg(pretrained, fd_lambda, name="dacs"):
    return from_dict({"model": {"name": "bisenet", "pretrained": str(pretrained), "num_classes": 19},
                      "adapt": {"name": name, "fd_lambda": fd_lambda},
                      "data": {"source": {"size": [64, 64]}, "target": {"size": [64, 64]}}})


def test_feature_distance_reaches_only_the_student_backbone(resnet18_file):
    from rtda.models import build_model

    source = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(1)),
              "label": torch.full((2, 64, 64), 13)}  # all car: every feature cell is a thing cell
    source["label"][:, :, :16] = 0
    target = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(2))}
    grads = {}
    for fd_lambda in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model(bisenet_dacs_cfg(resnet18_file, fd_lambda).model)
        strategy = adapt.build_strategy(bisenet_dacs_cfg(resnet18_file, fd_lambda), model)
        losses = strategy.training_step(model, source, target, FakeContext())
        grads[fd_lambda] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert all(p.grad is None for p in strategy.teacher.parameters())
        grads[fd_lambda, "losses"] = set(losses)
    assert losses["fd"] > 0 and "fd" in grads[0.5, "losses"] and "fd" not in grads[0.0, "losses"]
    frozen = strategy._fd.frozen.backbone
    assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters()) and not frozen.training
    reference = torch.load(resnet18_file, weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in frozen.state_dict().items() if k in reference)
    changed = {n for n in grads[0.0] if not torch.allclose(grads[0.0][n], grads[0.5][n], atol=1e-7, rtol=1e-5)}
    assert changed and all(n.startswith("backbone.") for n in changed)  # the heads see the same gradients
    assert any(n.startswith("backbone.layer4.") for n in changed)


def test_feature_distance_is_skipped_with_one_message_without_pretrained_weights(capsys):
    model = TinyNet()
    cfg = make_cfg("dacs", fd_lambda=0.005, fd_classes=[3, 4])
    strategy = adapt.build_strategy(cfg, model)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "adapt.fd_lambda = 0.005 ignored" in out and "model.pretrained = none" in out
    losses = strategy.training_step(model, *batches(), FakeContext())
    assert "fd" not in losses and strategy._fd is None


# ------------------------------------------------------------------------------------------------- MIC
def test_block_mask_patch_grid_and_ratio():
    g = torch.Generator().manual_seed(0)
    keep = adapt.mixing.block_mask((3, 128, 256), 64, 0.7, generator=g)
    assert keep.shape == (3, 1, 128, 256) and set(keep.unique().tolist()) <= {0.0, 1.0}
    blocks = keep.view(3, 2, 64, 4, 64)  # a 2 x 4 grid of 64 px patches, each all kept or all masked
    assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))
    # the patches are kept where MIC's uniform draw exceeds the ratio
    draws = torch.rand(3, 1, 2, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(blocks[:, :, 0, :, 0], (draws[:, 0] > 0.7).float())
    # over many patches 70% are masked
    many = adapt.mixing.block_mask((16, 512, 512), 8, 0.7, generator=torch.Generator().manual_seed(1))
    assert abs(1 - many.mean().item() - 0.7) < 0.005
    # MIC's grid is round(H / block): 100 rows at 64 px -> 2 patch rows of 50 px
    rows = adapt.mixing.block_mask((1, 100, 64), 64, 0.5, generator=torch.Generator().manual_seed(2))[0, 0, :, 0]
    assert len(torch.unique_consecutive(rows)) <= 2 and torch.equal(rows[:50], rows[:1].expand(50))


def test_zero_pixel_is_what_the_input_norm_maps_to_zero():
    from rtda.models.base import InputNorm

    for mode in ("imagenet", "caffe"):
        model = torch.nn.Module()
        model.input_norm = InputNorm(mode)
        pixel = adapt.mic.zero_pixel(model).view(1, 3, 1, 1)
        assert torch.allclose(model.input_norm(pixel.expand(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2), atol=1e-5)
    assert torch.equal(adapt.mic.zero_pixel(TinyNet()), torch.zeros(3))


def test_mic_learns_teacher_pseudo_labels_on_masked_target(monkeypatch):
    calls, inputs = [], []
    record_weighted_losses(monkeypatch, calls)
    torch.manual_seed(0)
    model = TinyNet()
    model.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().clone()))
    # target 16 rows: 64 px patches of a 512-row target are 2 px here; rows 64 / 64 -> 2 / 2. Threshold 0: pixel
    # weight 1 (a random teacher is never 0.968 confident, and a zero weight would hide where the loss goes)
    cfg = make_cfg("mic", pseudo_ignore_top=64, pseudo_ignore_bottom=64, pseudo_threshold=0.0)
    strategy = adapt.build_strategy(cfg, model)
    assert strategy.mask_block == 2
    source, target = batches()
    ctx = FakeContext(watch={"model": model, "teacher": strategy.teacher})
    losses = strategy.training_step(model, source, target, ctx)
    masked_image = inputs[3]  # forward passes: source, teacher on the target (a copy, hook included), mixed, masked
    assert set(losses) == {"seg", "mix", "pseudo_weight", "masked"}
    assert ctx.reached == [{"model"}, {"model"}, {"model"}]  # source, mix, masked: never the teacher
    (mix_label, mix_weight), (masked_label, masked_weight) = calls
    with torch.no_grad():  # the teacher's pseudo-labels of the unmasked target (the teacher is not updated here)
        teacher_logits = strategy.teacher(target["image"]).logits
        pseudo = F.interpolate(teacher_logits, size=(16, 32), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(masked_label, pseudo)
    expected_weight = adapt.daformer.pseudo_weight_map(losses["pseudo_weight"], (2, 16, 32), 2, 2)
    assert torch.equal(masked_weight, expected_weight)
    zero = (masked_image == 0).all(1)  # TinyNet normalises x / 255: the masked pixel is black
    blocks = zero.view(2, 8, 2, 16, 2)
    assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))  # whole 2 px patches
    assert 0.4 < zero.float().mean() < 0.95
    with pytest.raises(ValueError, match="adapt.mask_ratio"):
        adapt.build_strategy(make_cfg("mic", mask_ratio=1.0), TinyNet())


# ------------------------------------------------------------------------------------- rare class sampling
def test_rcs_probabilities_from_given_frequencies():
    counts = np.array([50, 30, 20, 0])  # f = 0.5, 0.3, 0.2; class 3 absent
    probs = rare_class.class_probabilities(counts, 0.01)
    logits = np.array([0.5, 0.7, 0.8]) / 0.01  # (1 - f) / T
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose(probs[:3], expected) and probs[3] == 0 and math.isclose(probs.sum(), 1)
    assert probs[2] > 0.99  # T = 0.01: the rarest class nearly always
    assert np.allclose(rare_class.class_probabilities(counts, 1e6)[:3], 1 / 3)  # a hot softmax: uniform


# label ids of the train ids used here: road 7 -> 0, car 26 -> 13, bicycle 33 -> 18, person 24 -> 11
ROAD, CAR, BICYCLE, PERSON = 7, 26, 33, 24


@pytest.fixture
def rcs_gta5(tmp_path) -> Path:
    """Six 64x128 GTA5 frames: road everywhere; a 16x16 car in frames 0-3, a 16x16 bicycle in frame 4 only,
    a few person pixels (below the image threshold) in frame 5."""
    root = tmp_path / "GTA5"
    rng = np.random.default_rng(0)
    for index in range(6):
        label = np.full((64, 128), ROAD, np.uint8)
        if index < 4:
            label[40:56, 10 + 20 * index:26 + 20 * index] = CAR
        if index == 4:
            label[8:24, 100:116] = BICYCLE
        if index == 5:
            label[0, :5] = PERSON
        save_png(root / "images" / f"{index + 1:05d}.png", rng.integers(0, 256, (64, 128, 3), dtype=np.uint8))
        save_palettised(root / "labels" / f"{index + 1:05d}.png", label)
    return root


def rcs_cfg(root: Path, **extra):
    data = {"source": {"name": "gta5", "root": str(root), "size": [128, 64]},
            "rcs": {"enabled": True, **extra.pop("rcs", {})}, "augment": extra.pop("augment", {})}
    return from_dict({"data": data, "train": {"workers": 0}, **extra})


def test_rcs_draws_classes_by_their_probabilities_and_images_holding_them(rcs_gta5):
    cfg = rcs_cfg(rcs_gta5)
    ds = build_dataset(cfg.data.source, cfg, "source")
    assert isinstance(ds, rare_class.RareClassSampling) and len(ds) == 6
    total = np.zeros(19)
    for stem in range(6):  # what the cache should hold
        total += np.bincount(ID_TO_TRAIN_ID[read_label_png(rcs_gta5 / "labels" / f"{stem + 1:05d}.png")].ravel(),
                             minlength=256)[:19]
    expected = rare_class.class_probabilities(total, 0.01)
    assert set(ds.classes.tolist()) == {0, 11, 13, 18} and np.allclose(ds.probs, expected[ds.classes])
    assert ds.fallback_classes == [11]  # 5 person pixels: below 3000 px of a 1914x1052 frame (12 px here)
    draws = [ds.draw(i, epoch) for epoch in range(100) for i in range(6)]
    for c, image, _ in draws:
        assert {0: True, 11: image == 5, 13: image < 4, 18: image == 4}[c]
    freq = np.bincount([c for c, _, _ in draws], minlength=19)[ds.classes] / len(draws)
    assert np.abs(freq - ds.probs).max() < 0.07
    assert ds.draw(3, 7)[:2] == ds.draw(3, 7)[:2]  # a function of (seed, epoch, index)
    for role in ("target", "val"):  # only the source is resampled
        assert not isinstance(build_dataset(cfg.data.source, cfg, role), rare_class.RareClassSampling)


def test_rcs_crops_contain_the_class_and_the_stream_is_reproducible(rcs_gta5):
    cfg = rcs_cfg(rcs_gta5, adapt={"crop": [24, 24]}, augment={"scale_crop": 0.5, "hflip": 0.5})
    ds = build_dataset(cfg.data.source, cfg, "source")
    assert ds.random_geometry and ds.dataset.augment is None  # the augmentation moved into the wrapper
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(6):
            c, _, _ = ds.draw(i, epoch)
            item = ds[i]
            assert item["image"].shape == (3, 24, 24) and item["label"].shape == (24, 24)
            assert item["label"].dtype == torch.uint8 and (item["label"] == c).any(), (epoch, i, c)
            again = ds[i]
            assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
    ds.set_epoch(0)
    first = [ds[i]["image"] for i in range(6)]
    ds.set_epoch(1)
    assert not all(torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))


def test_rcs_statistics_are_cached_once_keyed_by_the_label_files(rcs_gta5, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = rcs_cfg(rcs_gta5, rcs={"cache_dir": str(cache)})
    build_dataset(cfg.data.source, cfg, "source")
    (path,) = cache.glob("rare_class_stats_*.json")
    record = json.loads(path.read_text())
    assert len(record["images"]) == 6 and record["images"][4][:2] == [64, 128]
    assert record["images"][4][2][18] == 256  # the 16x16 bicycle

    def no_counting(self, index):
        raise AssertionError("counted again although cached")

    monkeypatch.setattr(rare_class._LabelCounts, "__getitem__", no_counting)
    build_dataset(cfg.data.source, cfg, "source")  # read from the cache
    monkeypatch.undo()

    label = rcs_gta5 / "labels" / "00002.png"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    build_dataset(cfg.data.source, cfg, "source")  # a changed label file: new statistics, new file
    assert len(list(cache.glob("rare_class_stats_*.json"))) == 2

    default = rcs_cfg(rcs_gta5)  # next to the data by default
    build_dataset(default.data.source, default, "source")
    (beside,) = rcs_gta5.glob("rare_class_stats_*.json")
    beside.write_text("my notes")  # not a cache: an error, and the file is left alone
    with pytest.raises(ConfigError, match="not the class statistics of these labels"):
        build_dataset(default.data.source, default, "source")
    assert beside.read_text() == "my notes"

    blocked = rcs_cfg(rcs_gta5, rcs={"cache_dir": str(beside / "sub")})  # a folder under a file: not writable
    with pytest.raises(ConfigError, match="data.rcs.cache_dir"):
        build_dataset(blocked.data.source, blocked, "source")


@pytest.mark.parametrize("key, value", [("temperature", 0.0), ("min_pixels", -1), ("min_crop_ratio", -0.5),
                                        ("tries", 0)])
def test_rcs_bad_values_name_the_key(rcs_gta5, key, value):
    cfg = rcs_cfg(rcs_gta5, rcs={key: value})
    with pytest.raises(ConfigError, match=f"data.rcs.{key} = "):
        build_dataset(cfg.data.source, cfg, "source")


# ------------------------------------------------------------------------------ through train.py
def tiny(root: Path, **extra) -> list[str]:
    return tiny_overrides(root, **{"data.synthetic.num_source": 8, "data.synthetic.num_val": 2, "train.iters": 2,
                                   "train.log_interval": 1, "train.vis_images": 0, **extra})


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_sota") / "data"


def assert_same(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs after the resume"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", NEW_SYNTHETIC)
def test_resumed_run_equals_an_uninterrupted_one(name, tiny_root, tmp_path, monkeypatch):
    cfg = load_config(SYNTHETIC / f"{name}.yaml", tiny(tiny_root, **{"train.iters": 4}))
    straight, resumed = straight_and_resumed(cfg, tmp_path, monkeypatch)
    assert resumed["iteration"] == straight["iteration"] == 4
    for part in ("model", "optimizer", "strategy"):  # teachers, discriminators and their Adam moments included
        assert_same(straight[part], resumed[part], part)


@pytest.mark.parametrize("name", NEW_PROTOCOL)
def test_protocol_config_trains_on_the_synthetic_domains(name, tiny_root, tmp_path, resnet18_file):
    """Each new protocol config, its recipe unchanged but for the data (synthetic, tiny) and the weights."""
    from rtda.engine import train

    deeplab = "deeplabv2" in name
    size = "[64,32]" if deeplab else "[128,64]"
    extra = {f"data.{r}.{k}": v for r in ("source", "target", "val")
             for k, v in (("name", "synthetic"), ("size", size))}
    extra.update({"data.source.domain": "source", "data.target.domain": "target", "data.val.domain": "target",
                  "train.batch_size": 2, "data.rcs.cache_dir": str(tmp_path / "rcs")})
    # the BiSeNet runs load a stand-in ImageNet file, so the feature distance runs too; ResNet-101 starts from scratch
    extra["model.pretrained"] = "none" if deeplab else str(resnet18_file)
    cfg = load_config(REPO / "configs" / f"{name}.yaml", tiny(tiny_root, **extra))
    if cfg.adapt.crop is not None:
        cfg.adapt.crop = [32, 32] if deeplab else [64, 64]
    run_dir = train(cfg, work_dir=tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["adapt"] == cfg.adapt.name and metrics["iterations"] == 2
    expected = {"minent": {"seg", "ent_main", "ent_aux"}, "advent": {"seg", "disc", "adv_main", "adv_aux"},
                "dacs": {"seg", "mix", "pseudo_weight"}, "mic": {"seg", "mix", "pseudo_weight", "masked"}}
    expected = expected[cfg.adapt.name] | ({"fd"} if cfg.adapt.name in ("dacs", "mic") and not deeplab else set())
    assert logged_losses(run_dir) == expected


def logged_losses(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag[len("loss/"):] for tag in events.Tags()["scalars"] if tag.startswith("loss/")}
