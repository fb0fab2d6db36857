"""DDRNet-23-slim and DDRNet-23 (Hong et al., "Deep Dual-resolution Networks for Real-time and Accurate Semantic
Segmentation of Road Scenes", 2021), after the official code ydhongHIT/DDRNet (MIT), `segmentation/DDRNet_23_slim.py`
and `segmentation/DDRNet_23.py`; the ImageNet files fit `classification/DDRNet_23*.py`.

    stem:      conv3x3 s2 (bias) BN ReLU, conv3x3 s2 (bias) BN ReLU, c channels            -> 1/4
    stage 1-2: 2 basic blocks each, c and 2c channels                                       -> 1/4, 1/8
    stage 3:   low branch 2 basic blocks (4c, 1/16); high branch 2 basic blocks (2c, 1/8);
               bilateral fusion: low += BN(conv3x3 s2(high)), high += up(BN(conv1x1(low)))
    stage 4:   low 2 basic blocks (8c, 1/32); high 2 basic blocks (2c); fusion as above (two s2 convs down)
    stage 5:   low 1 bottleneck s2 (16c, 1/64) -> DAPPM -> 4c, upsampled to 1/8; high 1 bottleneck (4c, 1/8)
    head:      BN ReLU conv3x3 BN ReLU conv1x1 (+bias) on low + high                         -> logits at 1/8
    training:  the same head (`seghead_extra`) on the high branch after stage 3's fusion (2c channels, 1/8);
               stages 1-5 are the paper's conv2, conv3, conv4, conv5_1, conv5_2

c = 32, head 64 channels for the slim net; c = 64, head 128 for DDRNet-23; DAPPM's branches have 128 channels.
A ReLU precedes every stage and fusion input (not in place: the pre-ReLU maps are summed too); the last block of each
stage ends without ReLU, as in the official `_make_layer` (`no_relu`). Bottlenecks expand 2x.

Deviations: (1) the official code resizes the low branch onto [H // 8, W // 8], which only matches the high branch
when H and W are multiples of 8; here it is resized onto the high branch's own size, so any input size works (the
same function at multiples of 8). (2) The head modules are `nn.Sequential`s (`head.0` ... `head.5`) instead of the
official `bn1/conv1/bn2/conv2` attributes, whose bn-before-conv order the deploy form's `convN`/`bnN` folding would
misread; only the authors' Cityscapes-trained files use those names, the ImageNet files hold none of them.
The training loss is the base class's (main + `aux_weight` * aux, OHEM on both): docs/models.md says why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtda.config import ConfigError, ModelConfig
from rtda.models.base import SegmentationModel, freeze_bn_affine

# The official segmentation and classification models build their BN layers with momentum 0.1 (PyTorch's default).


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of a feature map onto `like`'s grid (align_corners False, as the official F.interpolate)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    """ResNet basic block; `relu_out` False leaves the sum un-activated (the last block of a DDRNet stage)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None,
                 relu_out: bool = True):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(in_channels, channels, stride), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = _conv3x3(channels, channels), nn.BatchNorm2d(channels)
        self.downsample, self.relu_out = downsample, relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(out) if self.relu_out else out


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 to 2x the channels; no final ReLU (the official segmentation default)."""

    expansion = 2

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None,
                 relu_out: bool = False):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = _conv3x3(channels, channels, stride), nn.BatchNorm2d(channels)
        self.conv3, self.bn3 = nn.Conv2d(channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.downsample, self.relu_out = downsample, relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x))
        return F.relu(out) if self.relu_out else out


def make_stage(block: type, in_channels: int, channels: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """The official `_make_layer`: a 1x1 conv + BN shortcut when the shape changes; every block but the last of
    a stage of several ends with ReLU (a one-block stage keeps its block's default)."""
    out_channels = channels * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    layers = [block(in_channels, channels, stride, downsample)]
    layers += [block(out_channels, channels, relu_out=i < blocks - 1) for i in range(1, blocks)]
    return nn.Sequential(*layers)


def stem(planes: int) -> nn.Sequential:
    """The official stem of DDRNet and PIDNet (the `conv1` keys): two 3x3 stride-2 conv-BN-ReLU to 1/4."""
    return nn.Sequential(nn.Conv2d(3, planes, 3, 2, 1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                         nn.Conv2d(planes, planes, 3, 2, 1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out_channels)]


class DualResolutionBackbone(nn.Module):
    """Stem, the two branches (`layerN` low resolution, `layerN_` high resolution) and their bilateral fusions:
    exactly the tensors of the authors' ImageNet files, by the official names, less their classifier."""

    def __init__(self, planes: int):
        super().__init__()
        high = planes * 2
        self.conv1 = stem(planes)
        self.layer1 = make_stage(BasicBlock, planes, planes, 2)
        self.layer2 = make_stage(BasicBlock, planes, planes * 2, 2, stride=2)
        self.layer3 = make_stage(BasicBlock, planes * 2, planes * 4, 2, stride=2)
        self.layer4 = make_stage(BasicBlock, planes * 4, planes * 8, 2, stride=2)
        self.compression3 = nn.Sequential(*_conv_bn(planes * 4, high, 1))
        self.compression4 = nn.Sequential(*_conv_bn(planes * 8, high, 1))
        self.down3 = nn.Sequential(*_conv_bn(high, planes * 4, 3, 2))
        self.down4 = nn.Sequential(*_conv_bn(high, planes * 4, 3, 2), nn.ReLU(inplace=True),
                                   *_conv_bn(planes * 4, planes * 8, 3, 2))
        self.layer3_ = make_stage(BasicBlock, planes * 2, high, 2)
        self.layer4_ = make_stage(BasicBlock, high, high, 2)
        self.layer5_ = make_stage(Bottleneck, high, high, 1)
        self.layer5 = make_stage(Bottleneck, planes * 8, planes * 8, 1, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images -> (low branch after stage 5 [16c, 1/64], high branch after stage 5 [4c, 1/8], high
        branch after stage 3's fusion [2c, 1/8]: the auxiliary head's input)."""
        x = self.layer1(self.conv1(x))
        x = self.layer2(F.relu(x))
        low = self.layer3(F.relu(x))
        high = self.layer3_(F.relu(x))
        low, high = low + self.down3(F.relu(high)), high + _resize(self.compression3(F.relu(low)), high)
        stage3_high = high
        low, high = self.layer4(F.relu(low)), self.layer4_(F.relu(high))
        low, high = low + self.down4(F.relu(high)), high + _resize(self.compression4(F.relu(low)), high)
        return self.layer5(F.relu(low)), self.layer5_(F.relu(high)), stage3_high


def _bn_relu_conv(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)]


class DAPPM(nn.Module):
    """Deep Aggregation Pyramid Pooling: the input average-pooled at 5/2, 9/4, 17/8 and globally, each branch
    (BN ReLU conv1x1) upsampled, added to the previous branch's output and refined (BN ReLU conv3x3); the five
    concatenated, compressed (BN ReLU conv1x1) and added to a BN ReLU conv1x1 shortcut of the input."""

    def __init__(self, in_channels: int, branch_channels: int, out_channels: int):
        super().__init__()
        pools = [nn.AvgPool2d(5, 2, 2), nn.AvgPool2d(9, 4, 4), nn.AvgPool2d(17, 8, 8), nn.AdaptiveAvgPool2d(1)]
        self.scale0 = nn.Sequential(*_bn_relu_conv(in_channels, branch_channels, 1))
        for i, pool in enumerate(pools, 1):
            setattr(self, f"scale{i}", nn.Sequential(pool, *_bn_relu_conv(in_channels, branch_channels, 1)))
            setattr(self, f"process{i}", nn.Sequential(*_bn_relu_conv(branch_channels, branch_channels, 3)))
        self.compression = nn.Sequential(*_bn_relu_conv(branch_channels * 5, out_channels, 1))
        self.shortcut = nn.Sequential(*_bn_relu_conv(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.scale0(x)]
        for i in range(1, 5):
            pooled = _resize(getattr(self, f"scale{i}")(x), x)
            branches.append(getattr(self, f"process{i}")(pooled + branches[-1]))
        return self.compression(torch.cat(branches, 1)) + self.shortcut(x)


def segment_head(in_channels: int, mid_channels: int, num_classes: int) -> nn.Sequential:
    """The official `segmenthead`: BN ReLU conv3x3, BN ReLU conv1x1 with bias, at the input's resolution."""
    return nn.Sequential(*_bn_relu_conv(in_channels, mid_channels, 3), nn.BatchNorm2d(mid_channels),
                         nn.ReLU(inplace=True), nn.Conv2d(mid_channels, num_classes, 1))


# name -> (c, head channels): segmentation/DDRNet_23_slim.py and DDRNet_23.py's `DualResNet_imagenet`
VARIANTS = {"ddrnet23_slim": (32, 64), "ddrnet23": (64, 128)}
# tensors of the classification model that the segmentation network does not have (its classifier tail)
_CLASSIFIER_ONLY = ("down5.", "last_layer.", "linear.")


def convert_imagenet(state: dict, path: str) -> dict:
    """The authors' ImageNet file (the classification DualResNet's state dict, optionally under DataParallel's
    `module.`) -> the backbone's keys: the same names, less the classifier tail (`down5`, `last_layer`,
    `linear`), which the official segmentation code drops too (its load_state_dict(strict=False) skips them)."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    kept = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_ONLY)}
    if not any(k.startswith("layer3_.") for k in kept) or len(kept) == len(state):
        example = next(iter(state), "nothing")
        segmentation = " (a segmentation model's: it has spp.*)" if any(k.startswith("spp.") for k in state) else ""
        raise ConfigError(f"model.pretrained = {path}: holds {len(state)} tensors like {example!r}{segmentation}, "
                          f"which is not a DDRNet ImageNet checkpoint (classification DualResNet: layer3_.*, down5.*, "
                          f"linear.*)")
    return kept


class DDRNet(SegmentationModel):
    """DDRNet-23(-slim): main logits and, in training, the stage-3 auxiliary logits (`stage3`), both at 1/8."""

    bottleneck_stage = "backbone.layer5"  # the deepest low-resolution stage, before DAPPM
    convert_pretrained = staticmethod(convert_imagenet)

    def __init__(self, variant: str, num_classes: int, freeze_bn: bool = False, input_norm: str = "imagenet"):
        super().__init__(input_norm)
        planes, head = VARIANTS[variant]
        self.variant = variant
        self.backbone = DualResolutionBackbone(planes)
        self.spp = DAPPM(planes * 16, 128, planes * 4)
        self.head = segment_head(planes * 4, head, num_classes)
        self.aux_heads = nn.ModuleDict({"stage3": segment_head(planes * 2, head, num_classes)})
        for m in self.modules():  # the official initialisation (the ImageNet file then replaces the backbone's)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        if freeze_bn:
            freeze_bn_affine(self.backbone)

    def forward_logits(self, x, with_aux):
        if self.training and x.shape[0] < 2:
            raise ValueError(f"{self.variant} trains on batches of at least 2 images: the BN of DAPPM's global "
                             "branch normalises globally pooled features across the batch")
        low, high, stage3_high = self.backbone(x)
        logits = self.head(_resize(self.spp(low), high) + high)
        aux = {"stage3": self.aux_heads["stage3"](stage3_high)} if with_aux else {}
        return logits, aux


def _build(name: str, cfg: ModelConfig) -> DDRNet:
    if cfg.aux_head:
        raise ConfigError(f"model.aux_head is a DeepLabV2 option; {name} always has its stage-3 auxiliary head")
    return DDRNet(name, cfg.num_classes, freeze_bn=bool(cfg.freeze_bn), input_norm=cfg.input_norm)


def build_ddrnet23_slim(cfg: ModelConfig) -> DDRNet:
    return _build("ddrnet23_slim", cfg)


def build_ddrnet23(cfg: ModelConfig) -> DDRNet:
    return _build("ddrnet23", cfg)
