"""The evaluator: IoU on hand-built predictions, softmax ensembling, the CLI, and agreement with cityscapesscripts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from rtda import evaluation as evaluator
from rtda.config import load_config
from rtda.datasets import build_dataset
from rtda.utils.files import save_checkpoint

from conftest import tiny_overrides
from test_train import SOURCE_ONLY


def test_iou_on_hand_built_predictions():
    label = torch.tensor([[0, 0, 1, 1, 255, 3]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0]])  # the 2 falls on an ignored pixel: class 2 stays absent
    confusion = evaluator.update_confusion(torch.zeros(4, 4, dtype=torch.int64), pred, label)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    iou, miou = evaluator.iou_from_confusion(confusion)
    # road: TP 1, FN 1, FP 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2 absent; class 3: TP 0, FN 1 -> 0
    assert iou[0].item() == pytest.approx(1 / 3) and iou[1].item() == pytest.approx(2 / 3)
    assert math.isnan(iou[2].item()) and iou[3].item() == 0
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)  # the absent class is left out of the mean
    metrics = evaluator.metrics_from_confusion(confusion, names=["a", "b", "c", "d"])
    assert metrics == {"mIoU": 33.33, "IoU": {"a": 33.33, "b": 66.67, "c": None, "d": 0.0}}


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits.expand(len(images), -1, -1, -1)


def test_several_models_average_their_softmax():
    a, b = torch.randn(1, 5, 4, 6), torch.randn(1, 5, 4, 6)
    images = torch.zeros(2, 3, 4, 6, dtype=torch.uint8)
    probs = evaluator.predict_probs([FixedLogits(a), FixedLogits(b)], images)
    expected = (a.softmax(1) + b.softmax(1)) / 2
    assert torch.allclose(probs, expected.expand(2, -1, -1, -1), atol=1e-6)
    # upsampled (bilinear) to the label size before the softmax
    assert evaluator.predict_probs([FixedLogits(a)], images, size=(8, 12)).shape == (2, 5, 8, 12)


class RandomLogits(nn.Module):
    """Fixed-seed random class scores: predictions spread over all 19 classes."""

    def forward(self, images):
        generator = torch.Generator().manual_seed(int(images.float().sum()) % 10_000)
        return torch.randn(len(images), 19, *images.shape[-2:], generator=generator)


def test_official_cityscapes_evaluation_agrees(synthetic_root, tmp_path):
    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root, **{"eval.label_size": "full"}))
    val_set = build_dataset(cfg.data.val, cfg, "val")
    out = tmp_path / "predictions"
    out.mkdir()

    def save(batch, pred):
        for name, image, p in zip(batch["name"], batch["image"], pred):
            evaluator.prediction_image(p, image, "labelids").save(out / f"{name}.png")

    confusion = evaluator.evaluate([RandomLogits()], DataLoader(val_set, batch_size=2), torch.device("cpu"), 19,
                                   on_batch=save)
    _, ours = evaluator.iou_from_confusion(confusion)
    label_files = [val_set.label_path(i) for i in range(len(val_set))]
    official = evaluator.cityscapes_official_miou(out, label_files)
    assert 0 < ours < 0.2  # random predictions over 19 classes
    assert official == pytest.approx(ours, abs=1e-9)


def test_cli_scores_and_saves_predictions_at_the_label_size(synthetic_root, tmp_path, capsys):
    from rtda.models import build_model

    cfg = load_config(SOURCE_ONLY, tiny_overrides(synthetic_root))
    checkpoint = tmp_path / "gta5_bisenet" / "run" / "best.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict()}, checkpoint)
    out = tmp_path / "color"
    argv = ["--config", str(SOURCE_ONLY), "--checkpoint", str(checkpoint), *tiny_overrides(synthetic_root),
            "eval.label_size=full", "data.val.size=[64,32]", "--save-predictions", str(out), "--format", "color"]
    assert evaluator.main(argv) == 0
    printed = capsys.readouterr().out
    assert "gta5_bisenet/best" in printed and "bicycle" in printed and "mIoU" in printed
    saved = sorted(out.glob("*.png"))
    assert len(saved) == 4
    with Image.open(saved[0]) as image:  # the original 128x64 labels, not the 64x32 network input
        assert image.size == (128, 64) and image.mode == "RGB"

    assert evaluator.main(["--config", str(SOURCE_ONLY), "--checkpoint", str(tmp_path / "missing.pt"),
                           *tiny_overrides(synthetic_root)]) == 1
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err


def test_prediction_formats():
    pred = torch.tensor([[0, 18], [255, 13]])
    image = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    assert np.asarray(evaluator.prediction_image(pred, image, "labelids")).tolist() == [[7, 33], [0, 26]]
    assert np.asarray(evaluator.prediction_image(pred, image, "trainids")).tolist() == [[0, 18], [255, 13]]
    assert np.asarray(evaluator.prediction_image(pred, image, "color"))[0, 0].tolist() == [128, 64, 128]
    overlay = np.asarray(evaluator.prediction_image(pred, image, "overlay"))
    assert overlay[0, 0].tolist() == [114, 82, 114]  # half image, half road colour
