"""Losses the strategies share: segmentation cross-entropy (plain or pixel-weighted), ADVENT's entropy maps,
the upsampled softmaxes multi-level methods feed on, and the zero term that keeps unused outputs in the graph."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rtda.datasets.labels import IGNORE_INDEX
from rtda.models.base import upsample


def segmentation_loss(output, label: torch.Tensor, aux_weight: float,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the main logits plus `aux_weight` times that of each auxiliary output, each upsampled
    (bilinear, on the output's grid `output.align_corners`) to the label size [B, H, W] and computed in float32.
    Pixels labelled 255 are ignored.

    Without `weight`: the mean over the labelled pixels. With `weight` [B, H, W] (DACS's pixel-weighted form):
    the mean over *all* pixels of weight * CE, ignored pixels counting 0.
    """
    size, grid = label.shape[-2:], output.align_corners
    loss = _upsampled_ce(output.logits, label, size, weight, grid)
    for aux_logits in output.aux.values():
        loss = loss + aux_weight * _upsampled_ce(aux_logits, label, size, weight, grid)
    return loss


def _upsampled_ce(logits: torch.Tensor, label: torch.Tensor, size, weight: torch.Tensor | None,
                  align_corners: bool) -> torch.Tensor:
    if logits.shape[-2:] != size:
        logits = upsample(logits, size, align_corners)
    if weight is None:
        return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX)
    ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weight).mean()


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
