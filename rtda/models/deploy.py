"""The inference form of a segmentation model: eval-only, no auxiliary heads, BN folded, channels_last.

    fast = deploy(model)          # a copy; `model` is untouched
    logits = fast(images)         # = model.eval()(images) within 1e-4, in inference mode
    graph = fast.graph()          # the same computation without the inference-mode switch (export, compile)

Folding a BN layer into the conv before it removes one full read and write of every feature map, and
channels_last lets the oneDNN (CPU) and cuDNN convolutions skip their layout conversions. A BN that no conv
precedes (pre-activation BN -> ReLU -> conv, as in DDRNet's DAPPM and heads) stays one per-channel multiply-add.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rtda.models.base import SegmentationModel
from rtda.models.grid import upsample

_BN = nn.modules.batchnorm._BatchNorm


class DeployedModel(nn.Module):
    """Wraps a folded copy of a `SegmentationModel`; forward returns the eval-mode output (full-size logits)."""

    def __init__(self, model: SegmentationModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # inference mode skips autograd bookkeeping; not while fvcore/jit traces the model (unsupported there)
        with torch.inference_mode(not torch.jit.is_tracing()):
            return self.forward_graph(images)

    def forward_graph(self, images: torch.Tensor) -> torch.Tensor:
        """The computation itself, with no grad-mode switch: what an exporter or a compiler should trace."""
        x = self.model.input_norm(images).contiguous(memory_format=torch.channels_last)
        logits, _ = self.model.forward_logits(x, with_aux=False)
        return upsample(logits, images.shape[-2:], self.model.align_corners)

    @property
    def align_corners(self) -> bool:
        """The wrapped model's resize grid, for evaluation (`align_corners_of`)."""
        return self.model.align_corners

    def graph(self) -> nn.Module:
        """A module whose forward is `forward_graph` (sharing these weights), for torch.onnx and torch.compile."""
        return _Graph(self)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a deployed model is eval-only: train the original model and call deploy() again")
        return super().train(False)


class _Graph(nn.Module):
    def __init__(self, deployed: DeployedModel):
        super().__init__()
        self.deployed = deployed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.deployed.forward_graph(images)


def deploy(model: SegmentationModel) -> DeployedModel:
    """An eval-only copy of `model` for inference: auxiliary heads dropped, BN folded, channels_last."""
    folded = copy.deepcopy(model).eval()
    folded.aux_heads = nn.ModuleDict()
    fold_batchnorm(folded)
    replace_batchnorm_left(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    return DeployedModel(folded.to(memory_format=torch.channels_last))


def fold_batchnorm(module: nn.Module) -> None:
    """Fold every eval-mode BN into the conv before it, in place (the BN becomes an Identity); a BN that opens
    an `nn.Sequential` entry pair with a 1x1 conv after it (BiSeNetV2's context embedding) folds into that conv.

    Recognises the two ways our models pair them: consecutive entries of an `nn.Sequential` (our blocks,
    torchvision's `downsample`) and `convN`/`bnN` attributes (torchvision's ResNet stem and blocks).
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            if isinstance(module[i], _BN) and module[i].affine and _is_pointwise(module[i + 1]):
                module[i + 1] = fuse_bn_pointwise_conv(module[i], module[i + 1])
                module[i] = nn.Identity()
            if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], _BN):
                module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                module[i + 1] = nn.Identity()
    for k in ("1", "2", "3"):
        conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, _BN):
            setattr(module, f"conv{k}", fuse_conv_bn_eval(conv, bn))
            setattr(module, f"bn{k}", nn.Identity())


def _is_pointwise(module: nn.Module) -> bool:
    """A 1x1 conv without padding or groups: one whose input may be shifted and scaled per channel exactly."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.padding == (0, 0)
            and module.groups == 1)


def fuse_bn_pointwise_conv(bn: _BN, conv: nn.Conv2d) -> nn.Conv2d:
    """conv(bn(x)) as one conv: BN is x * s + t per input channel, so W' = W * s (over input channels) and
    b' = b + W t. Exact only for a 1x1 conv without padding (zero padding would see t where BN saw 0)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, bias=True).to(conv.weight)
    fused.train(conv.training)
    weight = conv.weight.detach()
    fused.weight.data.copy_(weight * scale.detach().view(1, -1, 1, 1))
    bias = weight.flatten(1) @ shift.detach()
    fused.bias.data.copy_(bias if conv.bias is None else bias + conv.bias.detach())
    return fused


class ChannelAffine(nn.Module):
    """What an eval-mode BN computes, x * scale + shift per channel, for a BN that no conv precedes (the
    pre-activation BN, ReLU, conv of DDRNet's DAPPM and heads): nothing to fold it into, one multiply-add left."""

    def __init__(self, bn: _BN):
        super().__init__()
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = -bn.running_mean * scale + (0 if bn.bias is None else bn.bias.detach())
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # channels on dim 1, whichever BN (2d, sync, 1d) it was
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))


def replace_batchnorm_left(module: nn.Module) -> None:
    """Replace, in place, every BN that `fold_batchnorm` left (no conv right before it) by its `ChannelAffine`."""
    for name, child in module.named_children():
        if isinstance(child, _BN):
            setattr(module, name, ChannelAffine(child))
        else:
            replace_batchnorm_left(child)
