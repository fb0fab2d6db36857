"""The published DeepLabV2 rows' recipes (issue 14, docs/recipes.md): the poly horizon against its closed form,
every `_paper` config resolving to the paper's keys, the one-line error for a missing caffe init file,
pseudo-labels in float32 under an AMP config, ClassMix counting 255 as DACS does, and bicubic image resizes."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rtda import adapt
from rtda.adapt import pseudo_labels
from rtda.config import ConfigError, from_dict, load_config
from rtda.engine import StepContext, poly_schedule
from rtda.models.base import SegmentationModel, SegOutput
from rtda.models.resnet import DEEPLAB_INIT_FILES, load_backbone_weights
from rtda.utils.files import load_checkpoint

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES_DOC = REPO / "docs" / "recipes.md"


# ------------------------------------------------------------------------------------------ poly horizon
@pytest.mark.parametrize("stop, horizon", [(150_000, 250_000), (100_000, 150_000), (1_000, None)])
@pytest.mark.parametrize("share", [0.0, 0.001, 0.25, 0.5, 0.999])
def test_poly_with_horizon_is_the_closed_form(stop, horizon, share):
    iteration = int(share * stop)
    expected = (1 - iteration / (horizon or stop)) ** 0.9
    assert poly_schedule(stop, 0.9, horizon=horizon)(iteration) == pytest.approx(expected, rel=1e-12)


def test_poly_horizon_defaults_to_the_stop_and_ends_where_the_papers_end():
    assert poly_schedule(1000, 0.9)(500) == poly_schedule(1000, 0.9, horizon=1000)(500) == 0.5 ** 0.9
    assert poly_schedule(1000, 0.9)(1000) == 0.0
    # the LR of the last step: AdaptSegNet 44% of base, FDA 37%
    assert poly_schedule(150_000, 0.9, horizon=250_000)(149_999) == pytest.approx(0.438, abs=1e-3)
    assert poly_schedule(100_000, 0.9, horizon=150_000)(99_999) == pytest.approx(0.372, abs=1e-3)
    # warm-up first, then the same closed form
    factor = poly_schedule(100, 0.9, warmup_iters=10, horizon=200)
    assert factor(4) == 0.5 and factor(50) == pytest.approx(0.75 ** 0.9)


def test_poly_horizon_below_the_stop_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"train\.poly_horizon = 90 is below the run's 100 iterations") as info:
        poly_schedule(100, 0.9, horizon=90)
    assert "\n" not in str(info.value)


class TinySeg(nn.Module):
    """A stand-in segmentation model: SegOutput at stride 2 in training, upsampled logits in eval."""

    # the supervised loss of a real model, with the test configs' aux_weight
    aux_weight, ohem, supervised_loss = 0.1, None, SegmentationModel.supervised_loss

    def __init__(self, classes: int = 19, scale: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(scale)

    def forward(self, images):
        logits = self.conv(images.float() / 255)
        if not self.training:
            return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return SegOutput(logits, {})


def test_discriminator_lr_follows_the_horizon_through_the_step_context():
    cfg = from_dict({"model": {"num_classes": 19}, "adapt": {"name": "adversarial"},
                     "train": {"iters": 150_000, "poly_horizon": 250_000}})
    model = TinySeg()
    strategy = adapt.build_strategy(cfg, model)
    factor = poly_schedule(cfg.train.iters, cfg.train.poly_power, cfg.train.warmup_iters, cfg.train.poly_horizon)
    ctx = StepContext(cfg.train.iters, torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False), factor)
    ctx.iteration = 120_000
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=g),
              "label": torch.randint(0, 19, (1, 64, 64), generator=g)}
    target = {"image": torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=g)}
    strategy.training_step(model, source, target, ctx)
    assert strategy.d_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * (1 - 120_000 / 250_000) ** 0.9)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_recipes") / "data"


def test_trainer_uses_the_horizon(synthetic_root, tmp_path):
    """Two iterations of a tiny run with horizon 8: the model's LR after them is base * (1 - 2/8) ** 0.9."""
    from rtda.engine import train

    cfg = load_config(CONFIGS / "synthetic" / "gta5_bisenet.yaml", tiny_overrides(
        synthetic_root, **{"train.iters": 2, "train.poly_horizon": 8, "train.vis_images": 0,
                           "data.synthetic.num_source": 4, "data.synthetic.num_val": 2}))
    last = load_checkpoint(train(cfg, work_dir=tmp_path) / "last.pt")
    for group in last["optimizer"]["param_groups"]:
        base = cfg.train.lr * (cfg.train.head_lr_mult if group["name"] == "head" else 1.0)
        assert group["lr"] == pytest.approx(base * 0.75 ** 0.9)


# ------------------------------------------------------------------------------ the published recipes
# Keys every published DeepLabV2 row shares (AdaptSegNet, FDA and DACS all start from the caffe DeepLab recipe).
SHARED = {
    "model.name": "deeplabv2", "model.backbone": "resnet101", "model.resnet_variant": "v1",
    "model.input_norm": "caffe", "model.freeze_bn": True, "model.num_classes": 19,
    "model.align_corners": True,  # the three codes upsample logits with align_corners=True (issue 28)
    "data.source.name": "gta5", "data.source.size": [1280, 720], "data.source.interpolation": "bicubic",
    "data.target.name": "cityscapes", "data.target.split": "train", "data.target.size": [1024, 512],
    "data.val.name": "cityscapes", "data.val.split": "val",
    "train.optimizer": "sgd", "train.lr": 2.5e-4, "train.momentum": 0.9, "train.weight_decay": 5e-4,
    "train.head_lr_mult": 10.0, "train.poly_power": 0.9, "train.warmup_iters": 0,
    "data.augment.hflip": 0.0, "data.augment.scale_crop": 0.0,
    "eval.label_size": "full",
}
ADAPTSEGNET = {
    "model.pretrained": "data/pretrained/DeepLab_resnet_pretrained_init-f81d91e8.pth",
    "model.aspp_dilations": [6, 12], "data.target.interpolation": "bicubic", "data.val.interpolation": "bicubic",
    "data.val.size": [1024, 512], "train.batch_size": 1, "train.iters": 150_000, "train.poly_horizon": 250_000,
    "adapt.name": "adversarial", "adapt.lambda_adv": 0.001, "adapt.gan": "bce", "adapt.discriminator": "standard",
    "adapt.d_lr": 1e-4, "adapt.d_betas": [0.9, 0.99], "adapt.source_label": 0.0, "adapt.target_label": 1.0,
    "train.official_param_repeats": "torch0.4",  # get_1x_lr_params_NOscale's repeats, PyTorch 0.4's SGD loop
}
FDA = {
    "model.pretrained": "data/pretrained/DeepLab_init.pth", "model.aspp_dilations": [6, 12, 18, 24],
    "model.aux_head": False, "data.target.interpolation": "bicubic", "data.val.interpolation": "bicubic",
    "data.val.size": [1344, 576], "train.batch_size": 1, "train.iters": 100_000, "train.poly_horizon": 150_000,
    "adapt.name": "fda", "adapt.crop": [1024, 512], "adapt.entropy_weight": 0.005, "adapt.entropy_eta": 2.0,
    "adapt.entropy_eps": 1e-8, "adapt.entropy_start": 0,
    "train.official_param_repeats": "torch1",  # get_1x_lr_params_NOscale's repeats, PyTorch 1.x's SGD loop
}
FDA_SSL = {"data.target.pseudo_labels": "runs/pseudo_labels/gta5_deeplabv2_fda_mbt_paper", "adapt.pseudo_weight": 1.0,
           "adapt.pseudo_percentile": 0.66, "adapt.pseudo_cap": 0.9}
PAPER_ROWS = {
    "gta5_deeplabv2_adv_paper": {**ADAPTSEGNET, "adapt.multi_level": False, "model.aux_head": False},
    "gta5_deeplabv2_adv_multi_paper": {**ADAPTSEGNET, "adapt.multi_level": True, "model.aux_head": True,
                                       "model.aux_weight": 0.1, "adapt.lambda_adv_aux": 0.0002},
    **{f"gta5_deeplabv2_fda_b{b}_paper": {**FDA, "adapt.beta": float(b), "data.target.pseudo_labels": None}
       for b in ("0.01", "0.05", "0.09")},
    **{f"gta5_deeplabv2_fda_ssl_b{b}_paper": {**FDA, **FDA_SSL, "adapt.beta": float(b)} for b in ("0.01", "0.05", "0.09")},
    "gta5_deeplabv2_dacs_paper": {
        "model.pretrained": "data/pretrained/resnet101COCO-41f33a49.pth", "model.aspp_dilations": [6, 12],
        "model.aux_head": False, "data.target.interpolation": "bilinear", "data.val.interpolation": "bilinear",
        "data.val.size": [1024, 512], "train.batch_size": 2, "train.iters": 250_000, "train.poly_horizon": None,
        "adapt.name": "dacs", "adapt.crop": [512, 512], "adapt.mix_fraction": 0.5, "adapt.mix_ignore_as_class": True,
        "adapt.ema_alpha": 0.99, "adapt.pseudo_threshold": 0.968, "adapt.jitter_strength": 0.25,
        "adapt.jitter_p": 0.8, "adapt.blur_p": 0.5, "adapt.blur_sigma": [0.15, 1.15], "adapt.blur_kernel": 0.1,
        "adapt.mix_weight": 1.0, "train.official_param_repeats": "torch1"},
}
# The torchvision-weight variants of the rows: the papers' schedule and scoring, ImageNet weights.
TORCHVISION_ROWS = {
    "gta5_deeplabv2_adv": {"train.iters": 150_000, "train.poly_horizon": 250_000, "adapt.name": "adversarial"},
    "gta5_deeplabv2_fda_b0.09": {"train.iters": 100_000, "train.poly_horizon": 150_000, "adapt.name": "fda"},
    "gta5_deeplabv2_dacs": {"train.iters": 250_000, "train.poly_horizon": None, "adapt.name": "dacs"},
}
# ADVENT's and DAFormer's rows: scored on the full labels as their papers report; ADVENT stops at 120k of a 250k decay.
SELF_TRAINING_ROWS = {
    "gta5_deeplabv2_minent": {"train.iters": 120_000, "train.poly_horizon": 250_000, "adapt.name": "minent"},
    "gta5_deeplabv2_advent": {"train.iters": 120_000, "train.poly_horizon": 250_000, "adapt.name": "advent"},
    # DAFormer's ClassMix draw: the batch's classes, 255 counted; MIC's 32 px patches at this half resolution
    **{f"gta5_{net}_{method}": {"train.iters": 40_000, "train.poly_horizon": None, "adapt.name": name,
                                "adapt.mix_ignore_as_class": True, "adapt.mix_classes_from_batch": True,
                                **({"adapt.mask_block": 32} if name == "mic" else {}),
                                **({"model.freeze_bn": False} if net == "deeplabv2" else {})}
       for net in ("deeplabv2", "bisenet") for method, name in (("daformer_dacs", "dacs"), ("mic", "mic"))},
}


def resolved(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_paper_config_resolves_to_the_papers_recipe(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    expected = {**SHARED, **PAPER_ROWS[name]}
    wrong = {k: (resolved(cfg, k), v) for k, v in expected.items() if resolved(cfg, k) != v}
    assert not wrong, f"{name}: key: (config, paper) {wrong}"


@pytest.mark.parametrize("name", sorted(TORCHVISION_ROWS))
def test_torchvision_rows_keep_imagenet_weights_with_the_papers_schedule_and_scoring(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    expected = {"model.pretrained": "imagenet", "model.resnet_variant": "v1.5", "model.input_norm": "imagenet",
                "model.aspp_dilations": [6, 12, 18, 24], "eval.label_size": "full", "model.align_corners": False,
                **TORCHVISION_ROWS[name], "train.official_param_repeats": "none"}  # the repeats are the published rows' alone
    wrong = {k: (resolved(cfg, k), v) for k, v in expected.items() if resolved(cfg, k) != v}
    assert not wrong, f"{name}: key: (config, expected) {wrong}"


@pytest.mark.parametrize("name", sorted(SELF_TRAINING_ROWS))
def test_advent_and_daformer_rows_score_the_full_labels_with_their_papers_schedule(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    expected = {"eval.label_size": "full" if "deeplabv2" in name else "protocol", **SELF_TRAINING_ROWS[name]}
    wrong = {k: (resolved(cfg, k), v) for k, v in expected.items() if resolved(cfg, k) != v}
    assert not wrong, f"{name}: key: (config, expected) {wrong}"


def test_every_paper_config_is_in_the_table_and_in_docs_recipes():
    on_disk = {p.stem for p in CONFIGS.glob("*_paper.yaml")}
    assert on_disk == set(PAPER_ROWS)
    doc = RECIPES_DOC.read_text()
    missing = [name for name in sorted(on_disk | set(TORCHVISION_ROWS)) if f"{name}.yaml" not in doc]
    assert not missing, f"docs/recipes.md does not name {missing}"


def test_paper_configs_name_a_known_caffe_init_file():
    for name in PAPER_ROWS:
        assert Path(load_config(CONFIGS / f"{name}.yaml").model.pretrained).name in DEEPLAB_INIT_FILES, name


# ------------------------------------------------------------------------------- missing caffe file
@pytest.mark.parametrize("name", ["gta5_deeplabv2_adv_paper", "gta5_deeplabv2_fda_b0.09_paper",
                                  "gta5_deeplabv2_dacs_paper"])
def test_missing_caffe_file_is_one_line_naming_its_source_and_its_place(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative data/pretrained/... does not exist here
    cfg = load_config(CONFIGS / f"{name}.yaml")
    with pytest.raises(FileNotFoundError) as info:
        load_backbone_weights(nn.Identity(), cfg.model.pretrained, "resnet101", caffe_setup=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"model.pretrained = {cfg.model.pretrained}: no such file")
    assert re.search(r"https?://\S+", message), message  # where the paper's code gets it
    assert f"put it at {tmp_path / cfg.model.pretrained}" in message  # and where it goes


def test_missing_caffe_file_through_build_model(tmp_path, monkeypatch):
    from rtda.models import build_model

    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "gta5_deeplabv2_adv_paper.yaml")
    with pytest.raises(FileNotFoundError, match="AdaptSegNet's train_gta2cityscapes_multi.py"):
        build_model(cfg.model)


def test_other_missing_files_keep_the_generic_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file \(expected none, imagenet or a weights file\)"):
        load_backbone_weights(nn.Identity(), str(tmp_path / "mine.pth"), "resnet101", caffe_setup=True)


# ------------------------------------------------------------------------- pseudo-labels in float32
def test_pseudo_labels_are_predicted_in_float32_under_an_amp_config(cityscapes_root, tmp_path, monkeypatch):
    """Pretend the machine would autocast (train.amp: bf16 on CUDA): the pseudo-label path must not."""
    from rtda import evaluation as evaluator
    from rtda.utils import amp as amp_module

    torch.manual_seed(0)
    model = TinySeg(scale=40.0).eval()  # large logits: bf16 rounding would move the confidences
    monkeypatch.setattr(evaluator, "load_models", lambda cfg, checkpoints, device: [model])
    monkeypatch.setattr(amp_module, "autocast_dtype", lambda amp, device: None if amp == "none" else torch.bfloat16)
    seen = []
    real_predict = evaluator.predict_probs

    def recording_predict(models, images, size=None, amp_dtype=None):
        seen.append(amp_dtype)
        return real_predict(models, images, size, amp_dtype)

    monkeypatch.setattr(evaluator, "predict_probs", recording_predict)

    def labels(amp: str, out: Path) -> dict:
        cfg = from_dict({"data": {"target": {"name": "cityscapes", "root": str(cityscapes_root), "split": "train",
                                             "size": [128, 64]}},
                         "train": {"amp": amp, "workers": 0}, "model": {"num_classes": 19}})
        pseudo_labels.write_pseudo_labels(cfg, ["unused.pt"], out)
        return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*/*.png"))}

    under_amp = labels("bf16", tmp_path / "bf16")
    assert seen and all(dtype is None for dtype in seen)  # float32 (no autocast) in both passes
    seen.clear()
    in_float32 = labels("none", tmp_path / "fp32")
    assert len(under_amp) == 4 and under_amp.keys() == in_float32.keys()
    assert all(np.array_equal(under_amp[k], in_float32[k]) for k in under_amp)


# --------------------------------------------------------------------------------- ClassMix as DACS
def test_class_mix_counts_255_as_a_class_only_when_asked():
    """4 classes + 255 in the label: DACS picks ceil(5 / 2) = 3 of the 5 (255 among them at times), the
    paper's description ceil(4 / 2) = 2 of the 4 classes, never 255."""
    label = torch.tensor([0, 1, 2, 3, 255, 255]).repeat(1, 4, 1)  # [1, 4, 6]
    seen_255 = 0
    for seed in range(40):
        for as_class, k in ((True, 3), (False, 2)):
            mask = adapt.mixing.class_mix_masks(label, 19, 0.5, torch.Generator().manual_seed(seed), ignore_as_class=as_class)
            chosen = set(label[mask].tolist())
            assert len(chosen) == k, (as_class, chosen)
            assert mask.eq(torch.isin(label, torch.tensor(sorted(chosen)))).all()  # whole classes only
            if as_class:
                seen_255 += 255 in chosen
            else:
                assert 255 not in chosen
    assert 0 < seen_255 < 40


def test_class_mix_default_keeps_its_random_stream():
    """ignore_as_class=False draws exactly what the function drew before the option existed."""
    label = torch.tensor([[0, 3, 5, 255], [7, 7, 2, 255]]).reshape(2, 1, 4)
    masks = adapt.mixing.class_mix_masks(label, 19, 0.5, torch.Generator().manual_seed(3))
    scores = torch.rand(2, 19, generator=torch.Generator().manual_seed(3))
    for b, present in enumerate(([0, 3, 5], [2, 7])):
        ranked = sorted(present, key=lambda c: float(scores[b, c]))[:math.ceil(len(present) / 2)]
        assert set(label[b][masks[b]].tolist()) == set(ranked)


def test_dacs_strategy_passes_its_class_mix_options(monkeypatch):
    calls = []
    real = adapt.mixing.class_mix_masks

    def recording(labels, num_classes, fraction, generator=None, ignore_as_class=False, from_batch=False):
        calls.append((ignore_as_class, from_batch))
        return real(labels, num_classes, fraction, generator, ignore_as_class, from_batch)

    monkeypatch.setattr(adapt.mixing, "class_mix_masks", recording)
    cfg = from_dict({"model": {"num_classes": 19},
                     "adapt": {"name": "dacs", "mix_ignore_as_class": True, "mix_classes_from_batch": True},
                     "data": {"source": {"size": [32, 16]}, "target": {"size": [32, 16]}}})
    model = TinySeg()
    strategy = adapt.build_strategy(cfg, model)
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randint(0, 256, (2, 3, 16, 32), dtype=torch.uint8, generator=g),
              "label": torch.randint(0, 19, (2, 16, 32), generator=g)}
    target = {"image": torch.randint(0, 256, (2, 3, 16, 32), dtype=torch.uint8, generator=g)}
    ctx = StepContext(10, torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False),
                      poly_schedule(10, 0.9))
    strategy.training_step(model, source, target, ctx)
    assert calls == [(True, True)]


# ---------------------------------------------------------------------------------- bicubic resizes
def test_interpolation_key_selects_the_image_resize(gta5_root):
    from rtda.datasets import build_dataset
    from rtda.datasets.io import read_image

    def first_image(interpolation: str) -> torch.Tensor:
        cfg = from_dict({"data": {"source": {"name": "gta5", "root": str(gta5_root), "size": [64, 32],
                                             "interpolation": interpolation}}})
        return build_dataset(cfg.data.source, cfg, "source")[0]["image"]

    raw = read_image(sorted((gta5_root / "images").glob("*.png"))[0])
    for name, mode in (("bilinear", InterpolationMode.BILINEAR), ("bicubic", InterpolationMode.BICUBIC)):
        expected = TF.resize(raw, [32, 64], interpolation=mode, antialias=True)
        assert torch.equal(first_image(name), expected), name
    assert not torch.equal(first_image("bilinear"), first_image("bicubic"))


def test_bad_interpolation_is_one_line_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"`data.source.interpolation` = 'nearest' is not one of 'bilinear', "
                                          r"'bicubic'") as info:
        from_dict({"data": {"source": {"interpolation": "nearest"}}})
    assert "\n" not in str(info.value)
