"""FDA: Fourier domain adaptation (low-frequency amplitude transfer), its entropy term and self-training round."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rtda.adapt.base import Strategy, random_crop, step_random
from rtda.adapt.losses import keep_unused_in_graph, segmentation_loss
from rtda.config import Config, ConfigError


def fda_source_to_target(source: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Each source image with the low-frequency amplitude of its target image, source phase kept (FDA).

    Raw 0-255 pixels in ([B, 3, H, W], uint8 or float), float pixels out, not clamped (as in FDA). The band is
    the frequencies |f_y|, |f_x| < b with b = floor(min(H, W) * beta): the reference's b x b corner blocks of the
    unshifted spectrum (frequencies -b..b-1) made symmetric, so the result is real and beta = 0 is the identity.
    """
    h, w = source.shape[-2:]
    if target.shape[-2:] != (h, w):
        target = F.interpolate(target.float(), size=(h, w), mode="bilinear", align_corners=False)
    b = math.floor(min(h, w) * beta)
    if b == 0:
        return source.float()
    spec_s = torch.fft.fft2(source.float())
    amp_t = torch.fft.fft2(target.float()).abs()
    band = _low_band(h, b, source.device)[:, None] & _low_band(w, b, source.device)[None, :]
    amp = torch.where(band, amp_t, spec_s.abs())
    return torch.fft.ifft2(torch.polar(amp, spec_s.angle())).real


def _low_band(n: int, b: int, device) -> torch.Tensor:
    freq = torch.fft.fftfreq(n, 1.0 / n, device=device)  # integer frequencies 0, 1, ..., -1
    return freq.abs() < b


def entropy_loss(logits: torch.Tensor, eta: float, eps: float) -> torch.Tensor:
    """FDA's Charbonnier-penalised entropy of logits [B, C, H, W]: mean over pixels of ((H / ln C)^2 + eps)^eta,
    in float32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    ent = -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])
    return ((ent * ent + eps) ** eta).mean()


class FDA(Strategy):
    """Fourier Domain Adaptation: supervised loss on source images in target style, entropy on the target.

    With `data.target.pseudo_labels` set this is the self-supervised round of FDA's SStrain.py:
    CE(source in target style) + pseudo_weight * CE(pseudo-labelled target) + entropy_weight * entropy.
    `pseudo_percentile` and `pseudo_cap` are read by `rtda.adapt.pseudo_labels`, which writes those labels.
    """

    needs_target = True
    keys = ("beta", "crop", "entropy_weight", "entropy_eta", "entropy_eps", "entropy_start", "pseudo_weight",
            "pseudo_percentile", "pseudo_cap")

    @classmethod
    def label(cls, a) -> str:
        return f"FDA (β={a.beta:g})"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        if not 0.0 <= cfg.adapt.beta < 0.5:
            raise ConfigError(f"adapt.beta = {cfg.adapt.beta}: expected 0 <= beta < 0.5 (FDA uses 0.01, 0.05, 0.09)")
        self.self_supervised = cfg.data.target.pseudo_labels is not None
        crop, src = cfg.adapt.crop, cfg.data.source.size
        if crop is not None and (len(crop) != 2 or crop[0] > src[0] or crop[1] > src[1]):
            raise ConfigError(f"adapt.crop = {crop}: expected [width, height] no larger than data.source.size {src}")
        width, height = cfg.adapt.crop or cfg.data.source.size
        if cfg.adapt.beta > 0 and math.floor(min(width, height) * cfg.adapt.beta) == 0:
            raise ConfigError(f"adapt.beta = {cfg.adapt.beta}: its band floor(min(H, W) * beta) is 0 pixels at the "
                              f"configured size {width}x{height}, so FDA would swap nothing; raise beta to at least "
                              f"{1 / min(width, height):.3g} or the image size (beta 0 turns the transfer off)")

    def training_step(self, model, source, target, ctx):
        a = self.cfg.adapt
        if a.crop is not None:  # FDA's loader: a random crop of the resized GTA5 image, the target size
            source = random_crop(source, a.crop, step_random(self.cfg, ctx))
        styled = fda_source_to_target(source["image"], target["image"], a.beta)
        with ctx.autocast():
            loss_seg = segmentation_loss(model, model(styled), source["label"])
        ctx.backward(loss_seg)
        losses = {"seg": loss_seg.detach()}

        use_entropy = a.entropy_weight > 0 and ctx.iteration >= a.entropy_start
        if not (use_entropy or self.self_supervised):
            return losses  # no target term yet: skip the target pass
        with ctx.autocast():
            out_t = model(target["image"])
            loss_t = keep_unused_in_graph([] if self.self_supervised else list(out_t.aux.values()))
            if use_entropy:
                loss_ent = entropy_loss(out_t.logits, a.entropy_eta, a.entropy_eps)
                loss_t = loss_t + a.entropy_weight * loss_ent
                losses["entropy"] = loss_ent.detach()
            if self.self_supervised:
                if "label" not in target:
                    raise ValueError("data.target.pseudo_labels is set but the target batch has no `label`")
                loss_pseudo = segmentation_loss(model, out_t, target["label"])
                loss_t = loss_t + a.pseudo_weight * loss_pseudo
                losses["pseudo"] = loss_pseudo.detach()
        ctx.backward(loss_t)
        return losses
