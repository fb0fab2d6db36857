"""Test-time augmentation (flip, scales), sliding-window inference and the confusion-matrix plot."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rtda import evaluation as evaluator
from rtda.config import ConfigError, from_dict, load_config
from rtda.evaluation import Inference, predict_probs, sliding_logits, window_starts
from rtda.utils.files import save_checkpoint

from conftest import tiny_overrides
from test_train import SOURCE_ONLY


class PerPixel(nn.Module):
    """Logits from each pixel alone (a 1x1 conv): equivariant to flips and crops."""

    def __init__(self, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, images):
        return self.conv(images.float() / 255)


class LeftHeavy(nn.Module):
    """Not flip-equivariant: class 0's logit grows towards the right edge."""

    def forward(self, images):
        b, _, h, w = images.shape
        ramp = torch.linspace(0, 3, w).expand(b, 1, h, w)
        return torch.cat([ramp, images.float().mean(1, keepdim=True) / 255, -ramp], 1)


class CropMean(nn.Module):
    """Each crop gets one constant logit: the mean of its pixels (shows how windows are averaged)."""

    def forward(self, images):
        return images.float().mean((1, 2, 3), keepdim=True).expand(-1, 1, *images.shape[-2:])


def test_inference_from_config_and_its_errors():
    cfg = from_dict({"eval": {"tta": {"flip": True, "scales": [0.5, 1.0]}, "window": [64, 32]}}).eval
    inference = Inference.from_config(cfg)
    assert inference.flip and inference.scales == (0.5, 1.0)
    assert inference.window == (32, 64) and inference.stride == (21, 42)  # (H, W); stride 2/3 of the window
    assert "flip" in inference.describe() and "sliding window" in inference.describe()
    assert Inference.from_config(from_dict({}).eval).plain
    bad = [({"tta": {"scales": []}}, "eval.tta.scales"), ({"tta": {"scales": [0]}}, "eval.tta.scales"),
           ({"window": [64, 32], "window_stride": [80, 10]}, "eval.window_stride"),
           ({"window_stride": [8, 8]}, "eval.window is null"), ({"window": [0, 32]}, "eval.window")]
    for section, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Inference.from_config(from_dict({"eval": section}).eval)


def test_window_starts_cover_the_length_and_end_flush():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(10, 4, 4) == [0, 4, 6]  # the last window is moved back to end at the border
    assert window_starts(8, 8, 5) == [0] and window_starts(3, 4, 2) == [0]


def test_sliding_window_equals_whole_image_when_the_window_covers_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.Upsample(size=(20, 30)))
    images = torch.rand(2, 3, 20, 30) * 255
    assert torch.equal(sliding_logits(model, images, (20, 30), (5, 5)), model(images))
    assert torch.equal(sliding_logits(model, images, (64, 64), (64, 64)), model(images))  # window shrinks to fit


def test_sliding_window_stitches_crops_exactly():
    images = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
    model = PerPixel()
    # a per-pixel model: any tiling gives the whole-image logits
    for window, stride in [((8, 8), (8, 8)), ((8, 12), (5, 7)), ((20, 7), (3, 3))]:
        assert torch.allclose(sliding_logits(model, images, window, stride), model(images), atol=1e-6)
    # one constant per crop: every pixel gets the mean over the crops that cover it
    image = torch.zeros(1, 3, 1, 10)
    image[..., 6:] = 255  # crops [0:4] -> 0, [3:7] -> 63.75, [6:10] -> 255
    out = sliding_logits(CropMean(), image, (1, 4), (1, 3))[0, 0, 0]
    expected = torch.tensor([0, 0, 0, 63.75 / 2, 63.75, 63.75, (63.75 + 255) / 2, 255, 255, 255])
    assert torch.allclose(out, expected)


def test_flip_tta_is_the_mean_of_both_views():
    images = torch.randint(0, 256, (2, 3, 6, 10), dtype=torch.uint8)
    flip = Inference(flip=True)
    # a flip-equivariant model: flip TTA changes nothing
    model = PerPixel()
    assert torch.allclose(predict_probs([model], images, inference=flip), predict_probs([model], images), atol=1e-6)
    # otherwise: the mean of the softmax of the image and the flipped-back softmax of the flipped image
    model = LeftHeavy()
    expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1).flip(-1)) / 2
    assert torch.allclose(predict_probs([model], images, inference=flip), expected, atol=1e-6)
    assert not torch.allclose(predict_probs([model], images), expected, atol=1e-3)


def test_multi_scale_tta_averages_upsampled_softmax():
    images = torch.randint(0, 256, (1, 3, 8, 12), dtype=torch.uint8)
    model = LeftHeavy()
    assert torch.equal(predict_probs([model], images, inference=Inference(scales=(1.0,))),
                       predict_probs([model], images))
    small = F.interpolate(images.float(), size=(4, 6), mode="bilinear", align_corners=False)
    half = F.interpolate(model(small), size=(8, 12), mode="bilinear", align_corners=False).softmax(1)
    expected = (half + model(images).softmax(1)) / 2
    got = predict_probs([model], images, inference=Inference(scales=(0.5, 1.0)))
    assert torch.allclose(got, expected, atol=1e-6)
    # a constant image looks the same at every scale: a per-pixel model then predicts the same everywhere
    flat = torch.full((1, 3, 8, 12), 77, dtype=torch.uint8)
    per_pixel = PerPixel()
    assert torch.allclose(predict_probs([per_pixel], flat, inference=Inference(True, (0.5, 1.0, 1.5))),
                          predict_probs([per_pixel], flat), atol=1e-6)
    # TTA at another label size: the output is at that size
    assert predict_probs([model], images, size=(16, 24), inference=Inference(True, (0.5, 1.0))).shape == (1, 3, 16, 24)


def test_sliding_window_with_tta_scales():
    images = torch.randint(0, 256, (1, 3, 16, 24), dtype=torch.uint8)
    model = PerPixel()
    whole = predict_probs([model], images, inference=Inference(True, (0.5, 1.0)))
    slid = predict_probs([model], images, inference=Inference(True, (0.5, 1.0), window=(8, 8), stride=(6, 6)))
    assert torch.allclose(whole, slid, atol=1e-5)


def test_confusion_plot_is_a_png_and_survives_empty_rows(tmp_path):
    confusion = torch.tensor([[8, 2, 0], [0, 0, 0], [1, 1, 8]])  # class 1 has no ground truth
    path = evaluator.save_confusion_plot(confusion, tmp_path / "sub" / "confusion.png", names=["a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.width > 200 and image.height > 200


def test_cli_with_tta_window_and_out_writes_table_and_confusion_plot(synthetic_root, tmp_path, capsys):
    from rtda.models import build_model

    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root))
    checkpoint = tmp_path / "run" / "best.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict()}, checkpoint)
    out = tmp_path / "scores"
    argv = ["--config", str(SOURCE_ONLY), "--checkpoint", str(checkpoint), *tiny_overrides(synthetic_root),
            "eval.tta.flip=true", "eval.tta.scales=[0.75,1.0]", "eval.window=[64,64]", "--out", str(out)]
    assert evaluator.main(argv) == 0
    printed = capsys.readouterr().out
    assert "TTA flip + scales [0.75, 1.0]" in printed and "sliding window" in printed and "mIoU" in printed
    # the outputs, and the manifest that lets a later run replace them (rtda.utils.files.record_outputs)
    assert sorted(p.name for p in out.iterdir()) == [".rtda-outputs.jsonl", "confusion.png", "iou_table.txt",
                                                      "metrics.json"]
    assert "bicycle" in (out / "iou_table.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    (column,) = metrics["columns"].values()
    assert len(metrics["classes"]) == 19 and set(column["IoU"]) == set(metrics["classes"])
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    assert evaluator.main([*argv[:4], *tiny_overrides(synthetic_root), "eval.window_stride=[8,8]"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.window" in err
