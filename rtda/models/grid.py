"""The one bilinear resize of logits and softmaxes, and the grid (`align_corners`) a model resizes them on."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """The bilinear resize of logits and softmaxes everywhere (the models' outputs, the losses, evaluation), on
    the model's grid `align_corners` (`align_corners_of(model)`); feature maps inside a model keep False."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def align_corners_of(model: nn.Module) -> bool:
    """The grid `model` resizes its logits on: its `align_corners` (through a DDP wrapper); False, the project's
    default grid, for a module without one (a stand-in, an ONNX file exported before the option)."""
    return bool(getattr(getattr(model, "module", model), "align_corners", False))
