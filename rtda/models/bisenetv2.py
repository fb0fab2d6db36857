"""BiSeNetV2 (Yu et al., "BiSeNet V2: Bilateral Network with Guided Aggregation for Real-time Semantic
Segmentation", IJCV 2021), layer by layer as CoinCheung/BiSeNet `lib/models/bisenetv2.py` builds it (MIT; the most used
implementation; mmseg's `backbones/bisenetv2.py` has the same layers).

    detail branch:   S1 2x conv3x3 (64, first stride 2), S2 3x (64, stride 2 first), S3 3x (128, idem)    -> 1/8
    semantic branch: stem (conv s2 16; [1x1 8 -> 3x3 s2 16] || max-pool s2; concat -> 3x3 16)           -> 1/4
                     S3 GE-s2 + GE (32) -> 1/8, S4 GE-s2 + GE (64) -> 1/16, S5 GE-s2 + 3x GE (128) -> 1/32,
                     context embedding (BN of the global average, 1x1 conv, added, 3x3 conv)
                     (GE: gather-and-expand, expansion 6, depth-wise 3x3, identity or strided shortcut)
    aggregation:     bilateral guided aggregation (BGA) of the 1/8 detail and 1/32 semantic features       -> 1/8
    segment head:    conv3x3 128 -> 1024, dropout 0.1, 1x1 -> classes (returned at 1/8)
    booster heads:   one per semantic stage (S5 before the context embedding, S4, S3, stem), training only:
                     conv3x3 -> 128, dropout 0.1, nearest x2, conv3x3 -> s*s channels, 1x1 -> classes, s the
                     stage's stride (32, 16, 8, 4); returned at half the stage's stride

Training loss (CoinCheung `tools/train_amp.py`): OHEM cross-entropy (p < 0.7, at least a 16th of the labelled
pixels) on the main and on each of the four booster outputs, each weight 1 (`model.aux_weight: 1`,
`model.ohem_thresh: 0.7`): the base class's `supervised_loss`, nothing to override.

Deviations, each for the model contract (any input size, trainable from the first step, exportable deploy form):
- The BGA resizes the 1/32 semantic maps to the 1/8 detail map's size (nearest) where CoinCheung's file upsamples
  them by a fixed nearest x4: the same for sides divisible by 32, and any other size works too (mmseg and the first
  CoinCheung version resize bilinearly). The heads return logits at their own stride (the loss and the eval output
  upsample them) instead of upsampling inside the head. With the official weights mapped onto these modules, the
  outputs equal the official module's at 128x256 (max abs difference 0, docs/models.md).
- The zero-initialised last BN of every GE layer (CoinCheung's `last_bn`) starts at 1 (mmseg's init): a zero
  gamma leaves the layer's convolutions without gradient on the first step.
- The shift (beta) of the context embedding's BN on the pooled features is frozen at 0, where its exactly zero
  gradient keeps it anyway (ContextEmbedding says why); the parameter count is unchanged.
- The context embedding's BN on the pooled features is followed by its 1x1 conv in one `nn.Sequential`, so that
  the deploy form folds it (rtda/models/deploy.py); the computation is the same.
Trained from scratch, as the paper does: there is no ImageNet file to convert (`convert_pretrained` None), no
ImageNet features to keep (`bottleneck_stage` None). CoinCheung's later code loads an ImageNet-trained
`backbone_v2.pth` of his own (training code unpublished, CoinCheung/BiSeNet#192); that variant is not built here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.models.base import SegmentationModel


def conv_bn(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BN (+ ReLU)."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def depthwise_separable(channels: int) -> nn.Sequential:
    """Depth-wise 3x3 conv + BN, then a plain 1x1 conv (no BN): the BGA's two guided paths."""
    return nn.Sequential(*conv_bn(channels, channels, 3, groups=channels, relu=False),
                         nn.Conv2d(channels, channels, 1, bias=False))


class DetailBranch(nn.Sequential):
    """Wide and shallow: 8 conv3x3-BN-ReLU layers at 1/2, 1/4, 1/8 (64, 64, 128 channels)."""

    def __init__(self):
        super().__init__()
        self.S1 = nn.Sequential(conv_bn(3, 64, stride=2), conv_bn(64, 64))
        self.S2 = nn.Sequential(conv_bn(64, 64, stride=2), conv_bn(64, 64), conv_bn(64, 64))
        self.S3 = nn.Sequential(conv_bn(64, 128, stride=2), conv_bn(128, 128), conv_bn(128, 128))


class StemBlock(nn.Module):
    """Stride 4 at 16 channels: a strided conv, then a conv path and a max-pool path concatenated and fused."""

    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 16, stride=2)
        self.left = nn.Sequential(conv_bn(16, 8, 1), conv_bn(8, 16, stride=2))
        self.right = nn.MaxPool2d(3, 2, 1)
        self.fuse = conv_bn(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fuse(torch.cat([self.left(x), self.right(x)], dim=1))


class GatherExpand(nn.Module):
    """Gather-and-expand layer: conv3x3, depth-wise 3x3 expanding 6x (two of them when strided, the first with
    stride 2), 1x1 projection, plus the input (stride 1) or a depth-wise-separable strided shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 6):
        super().__init__()
        mid = in_channels * expansion
        self.conv1 = conv_bn(in_channels, in_channels)
        if stride == 1:
            self.dwconv = conv_bn(in_channels, mid, groups=in_channels)
            self.shortcut = None
        else:
            self.dwconv = nn.Sequential(conv_bn(in_channels, mid, stride=2, groups=in_channels, relu=False),
                                        conv_bn(mid, mid, groups=mid))
            self.shortcut = nn.Sequential(*conv_bn(in_channels, in_channels, stride=2, groups=in_channels, relu=False),
                                          *conv_bn(in_channels, out_channels, 1, relu=False))
        self.conv2 = conv_bn(mid, out_channels, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(self.dwconv(self.conv1(x))) + shortcut)


class ContextEmbedding(nn.Module):
    """x + conv1x1(BN(global average of x)), then conv3x3: the semantic branch's global context."""

    def __init__(self, channels: int = 128):
        super().__init__()
        # BN then conv in one Sequential: the deploy form folds the BN into the 1x1 conv after it
        self.gap = nn.Sequential(nn.BatchNorm2d(channels), *conv_bn(channels, channels, 1))
        self.conv_last = conv_bn(channels, channels)
        # The first BN's shift gets an exactly zero gradient in training: the conv-BN after it subtracts the batch
        # mean, which removes any constant it adds. So it stays at its initial 0 under SGD (and weight decay);
        # frozen there, it trains exactly as in the official network and no parameter is left without gradient.
        self.gap[0].bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(x + self.gap(x.mean((2, 3), keepdim=True)))


class SemanticBranch(nn.Module):
    """Narrow and deep, to 1/32; returns the stage outputs the booster heads read and the final features."""

    def __init__(self):
        super().__init__()
        self.S1S2 = StemBlock()
        self.S3 = nn.Sequential(GatherExpand(16, 32, 2), GatherExpand(32, 32))
        self.S4 = nn.Sequential(GatherExpand(32, 64, 2), GatherExpand(64, 64))
        self.S5_4 = nn.Sequential(GatherExpand(64, 128, 2), *(GatherExpand(128, 128) for _ in range(3)))
        self.S5_5 = ContextEmbedding(128)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s2 = self.S1S2(x)
        s3 = self.S3(s2)
        s4 = self.S4(s3)
        s5_4 = self.S5_4(s4)
        return self.S5_5(s5_4), {"aux5_4": s5_4, "aux4": s4, "aux3": s3, "aux2": s2}


class BiSeNetV2Backbone(nn.Module):
    """The two branches (the paper's backbone): what `param_groups` calls the backbone."""

    def __init__(self):
        super().__init__()
        self.detail = DetailBranch()
        self.segment = SemanticBranch()


class GuidedAggregation(nn.Module):
    """BGA: the detail features gated by the upsampled semantic ones at 1/8, and the semantic features gated by
    the downsampled detail ones at 1/32 (then upsampled); summed and fused by conv3x3-BN-ReLU."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.left1 = depthwise_separable(channels)
        self.left2 = nn.Sequential(*conv_bn(channels, channels, stride=2, relu=False), nn.AvgPool2d(3, 2, 1))
        self.right1 = conv_bn(channels, channels, relu=False)
        self.right2 = depthwise_separable(channels)
        self.conv = conv_bn(channels, channels)

    def forward(self, detail: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        size = detail.shape[-2:]
        # strided 3x3s and the pool all give ceil(n / 2): detail 1/8 -> 1/32 meets the semantic map at any size
        left = self.left1(detail) * torch.sigmoid(_resize(self.right1(semantic), size))
        right = self.left2(detail) * torch.sigmoid(self.right2(semantic))
        return self.conv(left + _resize(right, size))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """CoinCheung's nearest x4 of the 1/32 maps, written as a resize to the 1/8 map's size (any input size)."""
    return F.interpolate(x, size=size, mode="nearest")


class SegmentHead(nn.Sequential):
    """conv3x3-BN-ReLU, dropout 0.1, [booster: nearest x2, conv3x3-BN-ReLU to `stride`^2 channels], 1x1 conv."""

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int, booster_stride: int | None = None):
        layers = [conv_bn(in_channels, mid_channels), nn.Dropout(0.1)]
        if booster_stride is not None:
            expanded = booster_stride * booster_stride
            layers += [nn.Upsample(scale_factor=2.0), conv_bn(mid_channels, expanded)]
            mid_channels = expanded
        super().__init__(*layers, nn.Conv2d(mid_channels, num_classes, 1))


# the booster heads: the semantic stage they read, its channels and stride; deepest first, so that the first aux
# output (multi-level adversarial training's second discriminator, MinEnt's) is the most semantic one
BOOSTERS = {"aux5_4": (128, 32), "aux4": (64, 16), "aux3": (32, 8), "aux2": (16, 4)}


class BiSeNetV2(SegmentationModel):
    """BiSeNetV2 under the model contract (rtda/models/base.py); see the module docstring."""

    bottleneck_stage = None  # trained from scratch: no ImageNet features for DAFormer's feature distance

    def __init__(self, num_classes: int = 19, input_norm: str = "imagenet"):
        super().__init__(input_norm)
        self.backbone = BiSeNetV2Backbone()
        self.bga = GuidedAggregation(128)
        self.head = SegmentHead(128, 1024, num_classes)
        self.aux_heads = nn.ModuleDict({name: SegmentHead(channels, 128, num_classes, booster_stride=stride)
                                        for name, (channels, stride) in BOOSTERS.items()})
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation (kaiming normal, fan_out; zero biases; BN 1, 0) but for `last_bn`."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_logits(self, x, with_aux):
        if self.training and x.shape[0] < 2:
            raise ValueError("BiSeNetV2 trains on batches of at least 2 images: the BN of its context embedding "
                             "normalises globally pooled features across the batch")
        detail = self.backbone.detail(x)
        semantic, stages = self.backbone.segment(x)
        logits = self.head(self.bga(detail, semantic))
        aux = {name: self.aux_heads[name](stages[name]) for name in BOOSTERS} if with_aux else {}
        return logits, aux
