"""What every segmentation model of this package shares: raw pixels in, the output contract, parameter groups.

Contract (docs/architecture.md): `forward(images)` takes raw 0-255 RGB pixels `[B, 3, H, W]` of any size;
in training mode it returns `SegOutput(logits, aux)` at the network's own stride, in eval mode the main
logits bilinearly upsampled to the input size.
"""
from __future__ import annotations

import abc
from typing import NamedTuple

import torch
from torch import nn

from rtda.models.grid import upsample
from rtda.models.losses import Ohem, segmentation_loss


class SegOutput(NamedTuple):
    """Training-mode output: main logits at the network's stride, named auxiliary logits, and the grid they are
    resized on (`align_corners` of the bilinear resize: the model's `align_corners`). The logits carry their grid
    so that every loss resizes them as the model does, without each strategy passing a flag it could forget."""

    logits: torch.Tensor
    aux: dict[str, torch.Tensor]
    align_corners: bool = False


# mean/std on the 0-1 scale (torchvision weights) and caffe BGR means on the 0-255 scale (DeepLab weights)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)


class InputNorm(nn.Module):
    """Raw 0-255 RGB pixels -> what the backbone's weights expect, as one multiply-add per channel.

    `imagenet`: x / 255, minus the ImageNet mean, over its std. `caffe`: RGB -> BGR, minus the caffe means.
    """

    def __init__(self, mode: str):
        super().__init__()
        if mode == "imagenet":
            std = torch.tensor(IMAGENET_STD)
            scale, shift = 1 / (255 * std), -torch.tensor(IMAGENET_MEAN) / std
        elif mode == "caffe":
            scale, shift = torch.ones(3), -torch.tensor(CAFFE_BGR_MEAN)
        else:
            raise ValueError(f"model.input_norm = {mode!r}: expected 'imagenet' or 'caffe'")
        self.mode = mode
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] of raw RGB pixels, got shape {tuple(images.shape)}")
        x = images.float()
        if self.mode == "caffe":
            x = x.flip(1)
        return torch.addcmul(self.shift, x, self.scale)

    def extra_repr(self) -> str:
        return self.mode


class SegmentationModel(nn.Module, abc.ABC):
    """Base class: subclasses set `backbone` and `aux_heads` and implement `forward_logits`."""

    backbone: nn.Module
    aux_heads: nn.ModuleDict

    def __init__(self, input_norm: str):
        super().__init__()
        self.input_norm = InputNorm(input_norm)
        # One home for `model.align_corners`: build_model sets it from the config; the model's own upsampling
        # uses it, its training output carries it to the losses (SegOutput) and evaluation reads it from the model
        # (align_corners_of), so no strategy or evaluator reads the config for it and none can disagree.
        self.align_corners = False
        # The supervised loss's recipe, set by build_model from the config like `align_corners`: the weight of
        # each auxiliary segmentation loss and OHEM (None: plain cross-entropy).
        self.aux_weight = 1.0
        self.ohem: Ohem | None = None

    @abc.abstractmethod
    def forward_logits(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised images -> (main logits at the network's stride, aux logits if `with_aux` else {})."""

    def forward(self, images: torch.Tensor):
        logits, aux = self.forward_logits(self.input_norm(images), with_aux=self.training)
        if self.training:
            return SegOutput(logits, aux, self.align_corners)
        return upsample(logits, images.shape[-2:], self.align_corners)

    def supervised_loss(self, output: SegOutput, label: torch.Tensor,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss this network trains with on a labelled batch (`label` [B, H, W], 255 ignored; `weight`
        [B, H, W] for a pixel-weighted pseudo-label loss): cross-entropy of the main logits plus `aux_weight`
        times that of each auxiliary output, OHEM with `ohem`. Networks with other heads (boundary, detail)
        override it, computing their extra targets from `label` on its device."""
        return segmentation_loss(output, label, self.aux_weight, weight, self.ohem)

    # `convert_pretrained(state, path) -> backbone state`: a network whose authors publish their own ImageNet
    # files maps those keys onto `self.backbone` (rtda.models.resnet.load_backbone_weights); None = torchvision's.
    convert_pretrained = None
    # The module (a path under the model) whose output is the backbone's bottleneck features, which DAFormer's
    # ImageNet feature distance compares (rtda/adapt/daformer.py); None for a network trained from scratch.
    bottleneck_stage: str | None = None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: the (pretrained) backbone and the new modules (trained at a higher LR)."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return {"backbone": [p for p in trainable if id(p) in in_backbone],
                "head": [p for p in trainable if id(p) not in in_backbone]}


def freeze_bn_affine(module: nn.Module) -> None:
    """Freeze the affine parameters (gamma, beta) of every BN layer in `module`.

    This is what "frozen BN" means in the caffe DeepLabV2 recipe (AdaptSegNet, ADVENT, FDA, DACS): the
    parameters get no gradient and are left out of `param_groups`, but the layers stay in training mode, so
    the running statistics keep following the training batches. Nothing overrides `train()`.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
