"""BiSeNet V1 (Yu et al., ECCV 2018) in the course's form, on a torchvision ResNet-18 or ResNet-101.

    spatial path: 3x (3x3 conv stride 2, BN, ReLU), 64/128/256 channels          -> 1/8
    context path: ResNet layer3 (1/16) and layer4 (1/32), an attention refinement module (ARM) on each;
                  the 1/32 branch is scaled by the global average of layer4 (the "tail")
    fusion:       concat(spatial, context16, context32 at 1/8) -> feature fusion module (FFM) -> 1x1 conv
    training:     two auxiliary 1x1 classifiers on the refined 1/16 and 1/32 context features, each already
                  upsampled to 1/8 (the tensors the fusion concatenates), returned at 1/8

The auxiliary path is the course template's (its supervision1/2 classify the context features after their
upsampling to the spatial path's 1/8 and then upsample the logits to the input size): the model returns the
1/8 logits and the loss (or the discriminator, the entropy) makes the second upsampling to the label size,
which in training is the input size. One reordering of the main path against the template: the final 1x1
conv runs at 1/8 before the upsampling, where the template upsamples first. A 1x1 conv commutes with
bilinear resizing (whose weights sum to one), so this is the same function up to float rounding (the main
logits agree with the template's to 2e-6), at 1/64 of the cost.
"""
from __future__ import annotations

import torch
from torch import nn

from rtda.models.base import SegmentationModel, freeze_bn_affine
from rtda.models.grid import upsample
from rtda.models.resnet import RESNETS, build_resnet, resnet_features


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class AttentionRefinement(nn.Module):
    """x * sigmoid(BN(conv1x1(global average of x))): channel attention from global context."""

    def __init__(self, channels: int):
        super().__init__()
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1),
                                       nn.BatchNorm2d(channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class FeatureFusion(nn.Module):
    """Fuse spatial and context features: conv-BN-ReLU, then x + x * squeeze-excitation(x)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.fuse = conv_bn_relu(in_channels, out_channels)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, out_channels, 1),
                                       nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 1),
                                       nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([spatial, context], dim=1))
        return torch.addcmul(x, x, self.attention(x))


class BiSeNet(SegmentationModel):
    bottleneck_stage = "backbone.layer4"

    def __init__(self, backbone: str = "resnet18", num_classes: int = 19, freeze_bn: bool = False,
                 resnet_variant: str = "v1.5", input_norm: str = "imagenet"):
        super().__init__(input_norm)
        self.backbone = build_resnet(backbone, resnet_variant)
        c16, c32 = RESNETS[backbone][2:]
        self.spatial_path = nn.Sequential(conv_bn_relu(3, 64, 2), conv_bn_relu(64, 128, 2), conv_bn_relu(128, 256, 2))
        self.arm16 = AttentionRefinement(c16)
        self.arm32 = AttentionRefinement(c32)
        self.ffm = FeatureFusion(256 + c16 + c32, num_classes)
        self.classifier = nn.Conv2d(num_classes, num_classes, 1)
        self.aux_heads = nn.ModuleDict({"context16": nn.Conv2d(c16, num_classes, 1),
                                        "context32": nn.Conv2d(c32, num_classes, 1)})
        for name, m in self.named_modules():  # the course code's initialisation of the new convs
            if isinstance(m, nn.Conv2d) and not name.startswith("backbone."):
                nn.init.kaiming_normal_(m.weight)
        if freeze_bn:
            freeze_bn_affine(self.backbone)

    def forward_logits(self, x, with_aux):
        if self.training and x.shape[0] < 2:
            raise ValueError("BiSeNet trains on batches of at least 2 images: the BN layers of its attention "
                             "modules normalise globally pooled features across the batch")
        spatial = self.spatial_path(x)
        layer3, layer4 = resnet_features(self.backbone, x)
        context16 = self.arm16(layer3)
        context32 = self.arm32(layer4) * layer4.mean((2, 3), keepdim=True)
        size = spatial.shape[-2:]
        context16, context32 = upsample(context16, size), upsample(context32, size)
        logits = self.classifier(self.ffm(spatial, torch.cat([context16, context32], dim=1)))
        aux = {}
        if with_aux:  # the template's first step: classify the 1/8 context (the loss upsamples once more)
            aux = {"context16": self.aux_heads["context16"](context16),
                   "context32": self.aux_heads["context32"](context32)}
        return logits, aux
