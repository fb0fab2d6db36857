"""The supervised losses models are trained with: pixel cross-entropy of upsampled logits, plain, pixel-weighted or
with online hard example mining (OHEM), and its sum over a `SegOutput`'s main and auxiliary logits.

A model's own training loss is its `supervised_loss` method (rtda/models/base.py); networks with extra heads
(boundary, detail) override it and build what they need from the label here, on the device. Strategies call
`rtda.adapt.losses.segmentation_loss(model, output, label, weight)` and never see which network they train.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rtda.datasets.labels import IGNORE_INDEX
from rtda.models.grid import upsample


class Ohem(NamedTuple):
    """Online hard example mining: the mean CE over the pixels whose probability of their label is below
    `thresh`, and at least the `min_kept` hardest labelled pixels of the batch (`None`: a 16th of them, as
    BiSeNetV2's and STDC's OhemCELoss; HRNet's OhemCrossEntropy, which DDRNet and PIDNet run, counts 131072)."""

    thresh: float
    min_kept: int | None = None


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor, align_corners: bool,
                        weight: torch.Tensor | None = None, ohem: Ohem | None = None) -> torch.Tensor:
    """Cross-entropy of `logits` [B, C, h, w] upsampled (bilinear, on the `align_corners` grid) to the label
    [B, H, W], in float32; pixels labelled 255 are ignored.

    Without `weight`: the mean over the labelled pixels (the OHEM-selected ones with `ohem`). With `weight`
    [B, H, W] (DACS's pixel-weighted pseudo-label form): the mean over *all* pixels of weight * CE, ignored
    pixels counting 0; OHEM does not apply there (it is a recipe for true labels).
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = upsample(logits, label.shape[-2:], align_corners)
    if weight is None and ohem is None:
        return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX)
    ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="none")
    if weight is not None:
        return (ce * weight).mean()
    return ohem_mean(ce, label != IGNORE_INDEX, ohem)


def ohem_mean(ce: torch.Tensor, labelled: torch.Tensor, ohem: Ohem) -> torch.Tensor:
    """The OHEM mean of per-pixel CE `ce` over the `labelled` mask, without a host sync: the losses sorted in
    descending order, the first k kept, k = max(#pixels with p < thresh, min_kept) clipped to #labelled."""
    ce = torch.where(labelled, ce, torch.full_like(ce, -1.0)).flatten()  # unlabelled sort last
    n_labelled = labelled.sum()
    min_kept = n_labelled // 16 if ohem.min_kept is None else torch.full_like(n_labelled, ohem.min_kept)
    n_hard = (ce > -torch.log(torch.tensor(ohem.thresh))).sum()
    k = torch.minimum(torch.maximum(n_hard, min_kept), n_labelled)
    ranked = ce.sort(descending=True).values
    kept = torch.arange(ranked.numel(), device=ranked.device) < k
    return (ranked * kept).sum() / k.clamp(min=1)


def segmentation_loss(output, label: torch.Tensor, aux_weight: float, weight: torch.Tensor | None = None,
                      ohem: Ohem | None = None) -> torch.Tensor:
    """Pixel cross-entropy (`pixel_cross_entropy`) of the main logits plus `aux_weight` times that of each
    auxiliary output of a `SegOutput`, on the output's grid."""
    loss = pixel_cross_entropy(output.logits, label, output.align_corners, weight, ohem)
    for aux_logits in output.aux.values():
        loss = loss + aux_weight * pixel_cross_entropy(aux_logits, label, output.align_corners, weight, ohem)
    return loss
