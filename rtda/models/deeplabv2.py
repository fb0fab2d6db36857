"""DeepLabV2 (Chen et al., TPAMI 2018) as the UDA literature runs it (AdaptSegNet, ADVENT, FDA, DACS).

ResNet-101 with layer3/layer4 dilated 2/4 instead of strided (output stride 8), then an ASPP classifier:
parallel 3x3 convs with dilations 6, 12, 18, 24 straight to class logits, summed. No CRF, no BN in the
head. `aspp_dilations: [6, 12]` is the reduced head that AdaptSegNet and DACS actually ran (a `return`
inside their loop) and DAFormer reproduces as `dlv2red`. `aux_head` adds the same classifier on layer3 for
multi-level adversarial training (AdaptSegNet's `deeplab_multi`).
"""
from __future__ import annotations

import torch
from torch import nn

from rtda.config import ConfigError
from rtda.models.base import SegmentationModel, freeze_bn_affine
from rtda.models.resnet import build_resnet, resnet_features


class ASPPClassifier(nn.Module):
    """Parallel dilated 3x3 convs from features straight to class logits, summed (DeepLabV2's ASPP-L)."""

    def __init__(self, in_channels: int, num_classes: int, dilations: list[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.branches:  # the DeepLab initialisation of the classifier
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(SegmentationModel):
    bottleneck_stage = "backbone.layer4"

    def __init__(self, num_classes: int = 19, aspp_dilations: tuple[int, ...] = (6, 12, 18, 24),
                 aux_head: bool = False, freeze_bn: bool = True, resnet_variant: str = "v1.5",
                 input_norm: str = "imagenet"):
        super().__init__(input_norm)
        if not aspp_dilations or any(d < 1 for d in aspp_dilations):
            raise ConfigError(f"model.aspp_dilations = {list(aspp_dilations)}: expected a non-empty list of rates >= 1")
        self.backbone = build_resnet("resnet101", resnet_variant, dilation=(2, 4))
        self.classifier = ASPPClassifier(2048, num_classes, list(aspp_dilations))
        self.aux_heads = nn.ModuleDict(
            {"layer3": ASPPClassifier(1024, num_classes, list(aspp_dilations))} if aux_head else {})
        if freeze_bn:
            freeze_bn_affine(self.backbone)

    def forward_logits(self, x, with_aux):
        layer3, layer4 = resnet_features(self.backbone, x)
        aux = {name: head(layer3) for name, head in self.aux_heads.items()} if with_aux else {}
        return self.classifier(layer4), aux
