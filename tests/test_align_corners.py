"""`model.align_corners` (issue 28, item 2): the grid logits and softmaxes are resized on, used alike by the model's
output, the losses, DACS's teacher and evaluation (label size, TTA scales); images keep align_corners=False.

Each test resizes a tiny model's known logits and compares against torch's own resize on the expected grid, and
checks that the other grid gives another answer (so the test would catch a site that ignores the option).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rtda import adapt
from rtda.adapt.losses import upsampled_softmaxes
from rtda.config import ConfigError, from_dict
from rtda.engine import StepContext
from rtda.evaluation.inference import Inference, predict_probs
from rtda.models import build_model, deploy
from rtda.models.base import SegmentationModel, SegOutput
from rtda.models.losses import segmentation_loss

CLASSES = 3


def resize(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class PooledLinear(SegmentationModel):
    """A tiny real SegmentationModel: stride-4 average pooling then a 1x1 conv (logits known through
    `forward_logits`), an auxiliary output twice the main logits; no backbone weights to load."""

    def __init__(self, align_corners: bool):
        super().__init__("imagenet")
        self.backbone = nn.Identity()
        self.aux_heads = nn.ModuleDict()
        self.head = nn.Conv2d(3, CLASSES, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[3.0, -1.0, 0.5], [-2.0, 2.0, 1.0], [0.5, 0.5, -3.0]])[..., None, None])
        self.align_corners = align_corners  # what build_model sets from model.align_corners

    def forward_logits(self, x, with_aux):
        logits = self.head(F.avg_pool2d(x, 4))
        return logits, ({"layer3": 2 * logits} if with_aux else {})

    def known_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_logits(self.input_norm(images), with_aux=False)[0]


def images(height: int = 16, width: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------------------------ config, model
def test_the_option_defaults_to_false_and_a_bad_value_is_one_line():
    assert from_dict({}).model.align_corners is False
    with pytest.raises(ConfigError, match=r"model\.align_corners.*expected bool") as info:
        from_dict({"model": {"align_corners": "maybe"}})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("align", [False, True])
def test_build_model_sets_the_grid_and_the_eval_output_is_resized_on_it(align):
    model = build_model({"name": "bisenet", "align_corners": align}).eval()
    assert model.align_corners is align
    x = images(32, 48)
    with torch.no_grad():
        logits = model.forward_logits(model.input_norm(x), with_aux=False)[0]
        out = model(x)
        assert torch.equal(out, resize(logits, (32, 48), align))
        assert not torch.allclose(out, resize(logits, (32, 48), not align), atol=1e-4)
        # the deploy form keeps the grid (BN folded: equal within the fold's rounding)
        fast = deploy(model)
        assert fast.align_corners is align
        assert torch.allclose(fast(x), out, atol=1e-4)


# ------------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("align, upsampled", [(True, [0.0, 1.0, 2.0, 3.0]), (False, [0.0, 0.75, 2.25, 3.0])])
def test_segmentation_loss_on_a_hand_computed_case(align, upsampled):
    """Two classes, logits [0, 3] (class 0) and 0 (class 1) on a 1x2 grid, label all class 0 at 1x4: the loss is
    the mean of log(1 + exp(-l)) over the class-0 logits l resized to 4 pixels on the model's grid."""
    logits = torch.tensor([[[[0.0, 3.0]], [[0.0, 0.0]]]])
    label = torch.zeros(1, 1, 4, dtype=torch.long)
    expected = sum(math.log1p(math.exp(-v)) for v in upsampled) / 4
    loss = segmentation_loss(SegOutput(logits, {}, align), label, aux_weight=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("align", [False, True])
def test_training_output_carries_the_grid_to_the_losses(align):
    model = PooledLinear(align).train()
    x, label = images(), torch.randint(0, CLASSES, (2, 16, 24), generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert out.align_corners is align
    logits = model.known_logits(x).detach()
    ce = {a: F.cross_entropy(resize(logits, (16, 24), a), label) + 0.1 * F.cross_entropy(
        resize(2 * logits, (16, 24), a), label) for a in (False, True)}
    loss = segmentation_loss(out, label, aux_weight=0.1)
    assert torch.allclose(loss, ce[align], atol=1e-6)
    assert not torch.allclose(loss, ce[not align], atol=1e-4)
    probs = upsampled_softmaxes(out, (16, 24), multi_level=True)
    assert torch.allclose(probs["main"], resize(logits, (16, 24), align).softmax(1), atol=1e-6)
    assert torch.allclose(probs["aux"], resize(2 * logits, (16, 24), align).softmax(1), atol=1e-6)
    assert not torch.allclose(probs["main"], resize(logits, (16, 24), not align).softmax(1), atol=1e-4)


@pytest.mark.parametrize("align", [False, True])
def test_dacs_teacher_pseudo_labels_are_resized_on_the_models_grid(align):
    cfg = from_dict({"model": {"num_classes": CLASSES, "align_corners": align}, "adapt": {"name": "dacs"},
                     "data": {"source": {"size": [24, 16]}, "target": {"size": [24, 16]}}})
    model = PooledLinear(align)
    strategy = adapt.build_strategy(cfg, model)
    ctx = StepContext(10, torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False), lambda i: 1.0)
    x = images()
    _, confidence, _ = strategy._pseudo_labels(x, ctx)
    logits = model.known_logits(x).detach()
    assert torch.allclose(confidence, resize(logits, (16, 24), align).softmax(1).amax(1), atol=1e-6)
    assert not torch.allclose(confidence, resize(logits, (16, 24), not align).softmax(1).amax(1), atol=1e-4)


# --------------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("align", [False, True])
def test_predict_probs_resizes_to_the_label_size_on_the_models_grid(align):
    model = PooledLinear(align).eval()
    x = images()
    logits = model.known_logits(x).detach()

    def expected(a: bool) -> torch.Tensor:  # the model's upsampling to the input, then to the label size
        return resize(resize(logits, (16, 24), a), (32, 48), a).softmax(1)

    probs = predict_probs([model], x, size=(32, 48))
    assert torch.allclose(probs, expected(align), atol=1e-6)
    assert not torch.allclose(probs, expected(not align), atol=1e-4)


@pytest.mark.parametrize("align", [False, True])
def test_tta_scales_resize_images_as_before_and_logits_on_the_models_grid(align):
    model = PooledLinear(align).eval()
    x = images()
    small = resize(x.float(), (8, 12), False)  # images: always align_corners=False

    def expected(a: bool) -> torch.Tensor:
        half = resize(resize(model.known_logits(small).detach(), (8, 12), a), (16, 24), a).softmax(1)
        return (half + resize(model.known_logits(x).detach(), (16, 24), a).softmax(1)) / 2

    probs = predict_probs([model], x, inference=Inference(scales=(0.5, 1.0)))
    assert torch.allclose(probs, expected(align), atol=1e-6)
    assert not torch.allclose(probs, expected(not align), atol=1e-4)


def test_an_onnx_file_keeps_the_grid(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rtda.models.export import OnnxModel, export_onnx

    for align in (False, True):
        model = PooledLinear(align).eval()
        path = tmp_path / f"align_{align}.onnx"
        export_onnx(deploy(model), path, (16, 24), dynamic=False, exporter="torchscript")
        onnx_model = OnnxModel(path)
        assert onnx_model.align_corners is align
        x = images(batch=1)
        assert torch.allclose(predict_probs([onnx_model], x, size=(32, 48)),
                              predict_probs([model], x, size=(32, 48)), atol=1e-5)
