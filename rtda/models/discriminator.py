"""Output-space discriminators for adversarial adaptation (AdaptSegNet, Tsai et al., CVPR 2018).

Both take class probabilities `[B, C, H, W]` and return one logit per 1/32 cell `[B, 1, ~H/32, ~W/32]`
(no sigmoid: the loss is BCE-with-logits, or MSE for LS-GAN).
"""
from __future__ import annotations

from torch import nn

CHANNELS = (64, 128, 256, 512)


def standard_discriminator(num_classes: int) -> nn.Sequential:
    """AdaptSegNet: five 4x4 convs, stride 2, 64-128-256-512-1 channels, LeakyReLU 0.2, no normalisation."""
    layers, in_channels = [], num_classes
    for out_channels in CHANNELS:
        layers += [nn.Conv2d(in_channels, out_channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        in_channels = out_channels
    layers.append(nn.Conv2d(in_channels, 1, 4, 2, 1))
    return nn.Sequential(*layers)


def light_discriminator(num_classes: int) -> nn.Sequential:
    """The same five stride-2 4x4 stages and widths, depthwise-separable after the first (~8% of the parameters).

    The first stage stays a full conv: it mixes the class channels and costs little (C x 64 x 16 weights).
    Each later stage is a depthwise 4x4 stride-2 conv followed by a pointwise 1x1 conv.
    """
    layers = [nn.Conv2d(num_classes, CHANNELS[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    for in_channels, out_channels in zip(CHANNELS, CHANNELS[1:] + (1,)):
        layers += [nn.Conv2d(in_channels, in_channels, 4, 2, 1, groups=in_channels),
                   nn.Conv2d(in_channels, out_channels, 1)]
        if out_channels != 1:
            layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


DISCRIMINATORS = {"standard": standard_discriminator, "light": light_discriminator}


def build_discriminator(kind: str, num_classes: int) -> nn.Module:
    if kind not in DISCRIMINATORS:
        raise ValueError(f"adapt.discriminator = {kind!r}: expected one of {', '.join(map(repr, DISCRIMINATORS))}")
    return DISCRIMINATORS[kind](num_classes)
