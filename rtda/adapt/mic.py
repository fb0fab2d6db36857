"""MIC: DACS (with DAFormer's options) plus masked image consistency on the target."""
from __future__ import annotations

import torch
from torch import nn

from rtda.adapt import mixing
from rtda.adapt.dacs import DACS
from rtda.adapt.daformer import protocol_pixels
from rtda.adapt.losses import segmentation_loss
from rtda.config import Config, ConfigError
from rtda.models.base import CAFFE_BGR_MEAN, IMAGENET_MEAN


def zero_pixel(model: nn.Module) -> torch.Tensor:
    """The raw RGB pixel [3] that `model.input_norm` maps to 0 (its weights' mean colour): what a masked pixel
    is in MIC, which zeroes normalised images. 0 for a model without that normalisation."""
    mode = getattr(getattr(model, "input_norm", None), "mode", None)
    if mode == "imagenet":
        return torch.tensor(IMAGENET_MEAN) * 255
    if mode == "caffe":
        return torch.tensor(CAFFE_BGR_MEAN).flip(0)
    return torch.zeros(3)


class MIC(DACS):
    """MIC (Hoyer et al. 2023) on DACS with DAFormer's options: DACS's step, then masked image consistency.

    The target batch is colour-jittered and blurred as the mixed image is (`jitter_*`, `blur_*`), then patches of
    `mask_block` px (at a 512-row target; scaled with data.target.size's height) are masked, each with probability
    `mask_ratio`: set to the pixel the model normalises to 0, as MIC zeroes normalised images. The student learns
    the EMA teacher's pseudo-labels of the unmasked target, with DACS's pixel weights (rows zeroed included),
    weighted `mask_lambda`.
    """

    keys = DACS.keys + ("mask_block", "mask_ratio", "mask_lambda")

    @classmethod
    def label(cls, a) -> str:
        return "MIC"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        a = cfg.adapt
        if not (0 <= a.mask_ratio < 1 and a.mask_block >= 1 and a.mask_lambda >= 0):
            raise ConfigError(f"adapt.mask_ratio = {a.mask_ratio}, adapt.mask_block = {a.mask_block}, adapt.mask_lambda "
                              f"= {a.mask_lambda}: expected a ratio in [0, 1), a patch >= 1 px and a weight >= 0 "
                              "(MIC: 0.7, 64, 1)")
        self.mask_block = max(1, protocol_pixels(a.mask_block, cfg.data.target.size[1]))
        self.register_buffer("zero_pixel", zero_pixel(model).view(1, 3, 1, 1), persistent=False)

    def target_losses(self, model, images, pseudo, weight, gen, ctx):
        a = self.cfg.adapt
        augmented = mixing.color_jitter(images.float(), a.jitter_strength, a.jitter_p, gen)
        augmented = mixing.gaussian_blur(augmented, a.blur_sigma, a.blur_kernel, a.blur_p, gen)
        keep = mixing.block_mask(pseudo.shape, self.mask_block, a.mask_ratio, images.device, gen)
        masked = torch.where(keep.bool(), augmented, self.zero_pixel.to(augmented.dtype))
        with ctx.autocast():
            loss = segmentation_loss(model, model(masked), pseudo, weight)
        ctx.backward(a.mask_lambda * loss)
        return {"masked": loss.detach()}
