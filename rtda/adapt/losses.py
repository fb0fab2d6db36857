"""Losses the strategies share: the model's supervised loss (plain or pixel-weighted), ADVENT's entropy maps,
the upsampled softmaxes multi-level methods feed on, and the zero term that keeps unused outputs in the graph."""
from __future__ import annotations

import math

import torch

from rtda.models.grid import upsample


def segmentation_loss(model, output, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The supervised loss of `model`'s training `output` against `label` [B, H, W] (255 ignored): the model's
    own `supervised_loss` (its auxiliary and boundary terms, OHEM where its recipe has it), through a DDP wrapper.

    Without `weight`: the mean over the labelled pixels. With `weight` [B, H, W] (DACS's pixel-weighted form):
    the mean over *all* pixels of weight * CE, ignored pixels counting 0.
    """
    net = getattr(model, "module", model)
    if not hasattr(net, "supervised_loss"):
        raise TypeError(f"{type(net).__name__} has no supervised_loss(output, label, weight): strategies train "
                        "SegmentationModels (rtda/models/base.py)")
    return net.supervised_loss(output, label, weight)


def self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's weighted self-information map of softmax outputs [B, C, H, W]: -p log2(p) / log2(C) per class,
    in float32."""
    probs = probs.float()
    return -probs * torch.log2(probs + 1e-30) / math.log2(probs.shape[1])


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy normalised to [0, 1], [B, H, W]: the self-information summed over the classes."""
    return self_information(probs).sum(1)


def upsampled_softmaxes(output, size, multi_level: bool, float32: bool = True) -> dict[str, torch.Tensor]:
    """Softmax of the main (and, multi-level, the first auxiliary) logits upsampled (bilinear, on the output's
    grid `output.align_corners`) to `size`:
    {"main": [B, C, H, W], "aux": ...}. Raises ValueError when multi-level and the model returned no aux output.

    `float32` casts the logits before the softmax (ADVENT's losses); AdaptSegNet's discriminators take the
    softmax in the autocast dtype (`float32=False`), which decides their inputs bit for bit.
    """
    levels = {"main": output.logits}
    if multi_level:
        if not output.aux:
            raise ValueError("adapt.multi_level = true: the model returned no auxiliary output (model.aux)")
        levels["aux"] = next(iter(output.aux.values()))
    upsampled = {k: upsample(v, size, output.align_corners) for k, v in levels.items()}
    return {k: (v.float() if float32 else v).softmax(1) for k, v in upsampled.items()}


def keep_unused_in_graph(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Zero times the outputs a loss leaves out (auxiliary heads), a 0-d tensor to add to that loss.

    Under DDP every parameter must reach each backward; this costs nothing next to the forward pass that made
    the outputs.
    """
    return sum((0.0 * v.float().mean() for v in outputs), torch.zeros(()))
