"""PIDNet's building blocks (XuJiacong/PIDNet models/model_utils.py, MIT), under the official attribute names so
the authors' ImageNet files load by name: Pag (pixel-attention-guided fusion), PAPPM (parallel
aggregation PPM, PIDNet-S/M), Light-Bag (boundary-attention-guided fusion) and the seg head. The residual
blocks, their stages and the stem are DDRNet's (rtda/models/ddrnet.py), which PIDNet's code inherits.

BN layers that come before their ReLU and conv (the PPM's and the seg head's pre-activation BNs) have no conv
before them to fold into: the deploy form keeps each as its per-channel multiply-add (rtda.models.deploy), as the
authors' own speed test keeps the BN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BN: the official compression/diff/downsample/Pag/Bag projections."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


class PagFM(nn.Module):
    """Pag: x (P branch) + sigma * (upsampled y (I branch) - x), sigma = sigmoid(<f_x(x), up(f_y(y))>) per pixel."""

    def __init__(self, in_channels: int, mid_channels: int):
        super().__init__()
        self.f_x = conv_bn(in_channels, mid_channels, 1)
        self.f_y = conv_bn(in_channels, mid_channels, 1)

    def forward(self, x, y):
        size = x.shape[-2:]
        y_q = F.interpolate(self.f_y(y), size=size, mode="bilinear", align_corners=False)
        sim = torch.sigmoid((self.f_x(x) * y_q).sum(dim=1, keepdim=True))
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return (1 - sim) * x + sim * y


def _bn_relu_conv(in_channels: int, out_channels: int, kernel: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False)]


class PAPPM(nn.Module):
    """Parallel aggregation PPM: average pools (5/2, 9/4, 17/8, global) of the 1/64 features, each projected and
    added to the unpooled projection, processed together by one grouped 3x3 conv, compressed, plus a shortcut."""

    def __init__(self, inplanes: int, branch_planes: int, outplanes: int):
        super().__init__()
        pools = [nn.AvgPool2d(5, 2, 2), nn.AvgPool2d(9, 4, 4), nn.AvgPool2d(17, 8, 8), nn.AdaptiveAvgPool2d(1)]
        for i, pool in enumerate(pools, start=1):
            setattr(self, f"scale{i}", nn.Sequential(pool, *_bn_relu_conv(inplanes, branch_planes)))
        self.scale0 = nn.Sequential(*_bn_relu_conv(inplanes, branch_planes))
        self.scale_process = nn.Sequential(*_bn_relu_conv(branch_planes * 4, branch_planes * 4, 3, groups=4))
        self.compression = nn.Sequential(*_bn_relu_conv(branch_planes * 5, outplanes))
        self.shortcut = nn.Sequential(*_bn_relu_conv(inplanes, outplanes))

    def forward(self, x):
        size = x.shape[-2:]
        x0 = self.scale0(x)
        scales = [F.interpolate(getattr(self, f"scale{i}")(x), size=size, mode="bilinear", align_corners=False) + x0
                  for i in range(1, 5)]
        out = self.scale_process(torch.cat(scales, dim=1))
        return self.compression(torch.cat([x0, out], dim=1)) + self.shortcut(x)


class LightBag(nn.Module):
    """Light-Bag: sigma = sigmoid(D); conv_p((1 - sigma) * I + P) + conv_i(I + sigma * P)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_p = conv_bn(in_channels, out_channels, 1)
        self.conv_i = conv_bn(in_channels, out_channels, 1)

    def forward(self, p, i, d):
        attention = torch.sigmoid(d)
        return self.conv_p((1 - attention) * i + p) + self.conv_i(i + attention * p)


def seg_head(inplanes: int, interplanes: int, outplanes: int) -> nn.Sequential:
    """The official segmenthead: BN-ReLU-3x3 conv-BN-ReLU-1x1 conv (with bias)."""
    return nn.Sequential(*_bn_relu_conv(inplanes, interplanes, 3), nn.BatchNorm2d(interplanes), nn.ReLU(inplace=True),
                         nn.Conv2d(interplanes, outplanes, 1))
