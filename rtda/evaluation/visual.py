"""Drawing predictions: Cityscapes colour maps and the saved prediction PNGs of `eval.py --save-predictions`.

`labelids` are the PNGs cityscapesscripts' evalPixelLevelSemanticLabeling reads; `trainids` the raw train
ids; `color` the Cityscapes palette; `overlay` half image, half palette.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rtda.datasets.labels import colorize as colorize_hwc
from rtda.datasets.labels import train_ids_to_label_ids

PREDICTION_FORMATS = ("labelids", "trainids", "color", "overlay")


def colorize(train_ids: torch.Tensor) -> torch.Tensor:
    """Train ids [H, W] -> Cityscapes colours as uint8 [3, H, W] (TensorBoard's CHW)."""
    return colorize_hwc(train_ids).permute(2, 0, 1)


def prediction_image(pred: torch.Tensor, image: torch.Tensor, fmt: str) -> Image.Image:
    """One saved prediction (train ids [H, W] on any device) as a PIL image in `fmt`."""
    pred = pred.to(torch.uint8).cpu()
    if fmt == "labelids":
        return Image.fromarray(train_ids_to_label_ids(pred).numpy())
    if fmt == "trainids":
        return Image.fromarray(pred.numpy())
    colours = colorize_hwc(pred).numpy()
    if fmt == "color":
        return Image.fromarray(colours)
    rgb = image.float()[None]
    if rgb.shape[-2:] != pred.shape:
        rgb = F.interpolate(rgb, size=pred.shape, mode="bilinear", align_corners=False)
    rgb = rgb[0].permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((0.5 * rgb + 0.5 * colours).round().astype(np.uint8))
