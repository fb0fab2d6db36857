"""Adaptation strategies: one small class per method, chosen by `adapt.name` (see docs/architecture.md).

A strategy is an nn.Module, so whatever it owns (a discriminator, an EMA teacher) travels with the checkpoint.
The trainer calls `training_step(model, source, target, ctx)` once per iteration and `after_step` after
the model's optimiser step; it knows nothing else about the method.
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import copy
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtda.config import Config, ConfigError, load_config
from rtda.datasets.labels import IGNORE_INDEX
from rtda.models.base import CAFFE_BGR_MEAN, IMAGENET_MEAN
from rtda.models.resnet import resnet_features


def segmentation_loss(output, label: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Cross-entropy (ignore 255) of the main and auxiliary logits, each upsampled to the label size."""
    size = label.shape[-2:]
    loss = _upsampled_ce(output.logits, label, size)
    for aux_logits in output.aux.values():
        loss = loss + aux_weight * _upsampled_ce(aux_logits, label, size)
    return loss


def _upsampled_ce(logits: torch.Tensor, label: torch.Tensor, size) -> torch.Tensor:
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX)


class Strategy(nn.Module, abc.ABC):
    """The interface the trainer drives. Subclasses set `needs_target`, implement `training_step` and name
    themselves in tables and plots through `label(adapt_cfg)`."""

    needs_target = False

    @classmethod
    @abc.abstractmethod
    def label(cls, a) -> str:
        """The method's name in the thesis tables and the mIoU-FPS plot, from its `adapt` section."""

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        self.cfg = cfg

    @abc.abstractmethod
    def training_step(self, model, source: dict, target: dict | None, ctx) -> dict[str, torch.Tensor]:
        """Compute the losses, call `ctx.backward` on them, return them detached for logging."""

    def after_step(self, model, ctx) -> None:
        """Called after the model's optimiser step (EMA teachers update here)."""


def _check_multi_level(cfg: Config) -> None:
    """Multi-level methods put their second term on the first auxiliary output: DeepLabV2 needs its aux head."""
    if cfg.adapt.multi_level and cfg.model.name == "deeplabv2" and not cfg.model.aux_head:
        raise ConfigError("adapt.multi_level = true needs an auxiliary output: set model.aux_head = true")


class SourceOnly(Strategy):
    """No adaptation: supervised loss on the labelled source batch."""

    @classmethod
    def label(cls, a) -> str:
        return "Source only"

    def training_step(self, model, source, target, ctx):
        with ctx.autocast():
            output = model(source["image"])
            loss = segmentation_loss(output, source["label"], self.cfg.model.aux_weight)
        ctx.backward(loss)
        return {"seg": loss.detach()}


class Adversarial(Strategy):
    """AdaptSegNet: output-space discriminators on the softmax of the upsampled logits (one per level).

    Per iteration: supervised loss on the source; adversarial loss pushing the target's softmax to look like
    the source's (source label), with the discriminators frozen; then one discriminator step on the detached
    source (source label) and target (target label) softmaxes, each loss halved.
    """

    needs_target = True

    @classmethod
    def label(cls, a) -> str:
        return f"Adversarial ({'multi' if a.multi_level else 'single'}-level, λ={a.lambda_adv:g})"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        from rtda.models.discriminator import build_discriminator

        a = cfg.adapt
        _check_multi_level(cfg)
        if len(a.d_betas) != 2:
            raise ConfigError(f"adapt.d_betas = {a.d_betas!r}: expected two numbers, e.g. [0.9, 0.99]")
        levels = ["main", "aux"] if a.multi_level else ["main"]
        self.discriminators = nn.ModuleDict(
            {level: build_discriminator(a.discriminator, cfg.model.num_classes) for level in levels})
        self.lambdas = {"main": a.lambda_adv, "aux": a.lambda_adv_aux}
        self.d_optimizer = torch.optim.Adam(self.discriminators.parameters(), lr=a.d_lr, betas=tuple(a.d_betas))
        self.gan_loss = F.binary_cross_entropy_with_logits if a.gan == "bce" else F.mse_loss

    def training_step(self, model, source, target, ctx):
        a, cfg = self.cfg.adapt, self.cfg
        discriminators = self.discriminators
        with ctx.autocast():
            out_s = model(source["image"])
            loss_seg = segmentation_loss(out_s, source["label"], cfg.model.aux_weight)
        ctx.backward(loss_seg)
        with torch.no_grad(), ctx.autocast():  # what the discriminators see of the source: no graph needed
            probs_s = self._softmaxes(out_s, source["image"].shape[-2:])
        del out_s

        # Generator: fool the discriminators on the target. They are frozen so this loss reaches the model only.
        discriminators.requires_grad_(False)
        with ctx.autocast():
            out_t = model(target["image"])
            probs_t = self._softmaxes(out_t, target["image"].shape[-2:])
            adv = {k: self._gan(discriminators[k](p), a.source_label) for k, p in probs_t.items()}
            loss_adv = sum(self.lambdas[k] * v for k, v in adv.items())
            loss_adv = loss_adv + _unused(list(out_t.aux.values())[len(adv) - 1:])
        ctx.backward(loss_adv)
        discriminators.requires_grad_(True)

        # Discriminators: on detached softmaxes, so this step never reaches the segmentation network.
        ctx.zero_grad(self.d_optimizer)
        for group in self.d_optimizer.param_groups:
            group["lr"] = a.d_lr * ctx.lr_factor  # the model's poly schedule
        with ctx.autocast():
            loss_d = sum(0.5 * self._gan(discriminators[k](p), a.source_label) for k, p in probs_s.items())
            loss_d = loss_d + sum(0.5 * self._gan(discriminators[k](p.detach()), a.target_label)
                                  for k, p in probs_t.items())
        ctx.backward(loss_d)
        if ctx.last_micro_step:
            _average_across_processes(self.discriminators)
        ctx.step(self.d_optimizer)

        losses = {"seg": loss_seg.detach(), "disc": loss_d.detach()}
        losses.update({f"adv_{k}": v.detach() for k, v in adv.items()})
        return losses

    def _softmaxes(self, output, size) -> dict[str, torch.Tensor]:
        """Softmax of the upsampled main (and first auxiliary) logits, as AdaptSegNet feeds its discriminators."""
        levels = {"main": output.logits}
        if "aux" in self.discriminators:
            if not output.aux:
                raise ValueError("adapt.multi_level = true: the model returned no auxiliary output (model.aux)")
            levels["aux"] = next(iter(output.aux.values()))
        return {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False).softmax(1)
                for k, v in levels.items()}

    def _gan(self, d_out: torch.Tensor, label: float) -> torch.Tensor:
        d_out = d_out.float()
        return self.gan_loss(d_out, torch.full_like(d_out, label))

    def get_extra_state(self):
        return {"d_optimizer": self.d_optimizer.state_dict()}

    def set_extra_state(self, state):
        self.d_optimizer.load_state_dict(state["d_optimizer"])


# ------------------------------------------------------------------------------------------------ ADVENT
def self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's weighted self-information map of softmax outputs [B, C, H, W]: -p log2(p) / log2(C) per class."""
    probs = probs.float()
    return -probs * torch.log2(probs + 1e-30) / math.log2(probs.shape[1])


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy normalised to [0, 1], [B, H, W]: the self-information summed over the classes."""
    return self_information(probs).sum(1)


def upsampled_softmaxes(output, size, multi_level: bool) -> dict[str, torch.Tensor]:
    """Softmax of the main (and, multi-level, the first auxiliary) logits upsampled to `size`, as ADVENT uses."""
    levels = {"main": output.logits}
    if multi_level:
        if not output.aux:
            raise ValueError("adapt.multi_level = true: the model returned no auxiliary output (model.aux)")
        levels["aux"] = next(iter(output.aux.values()))
    return {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False).float().softmax(1)
            for k, v in levels.items()}


class MinEnt(Strategy):
    """ADVENT's MinEnt: supervised loss on the source, entropy minimisation on the target.

    The target term is lambda_ent * mean normalised entropy of the softmax of the upsampled main logits
    (ADVENT's entropy_loss: sum(-p log2 p) / (N H W log2 C)), plus lambda_ent_aux times the same on the first
    auxiliary output when `adapt.multi_level` is set (ADVENT: 0.001 / 0.0002).
    """

    needs_target = True

    @classmethod
    def label(cls, a) -> str:
        return f"MinEnt ({'multi' if a.multi_level else 'single'}-level, λ={a.lambda_ent:g})"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        a = cfg.adapt
        _check_multi_level(cfg)
        for key in ("lambda_ent", "lambda_ent_aux"):
            if getattr(a, key) < 0:
                raise ConfigError(f"adapt.{key} = {getattr(a, key)}: expected a weight >= 0 (ADVENT: 0.001 / 0.0002)")
        self.lambdas = {"main": a.lambda_ent, "aux": a.lambda_ent_aux}

    def training_step(self, model, source, target, ctx):
        cfg = self.cfg
        with ctx.autocast():
            loss_seg = segmentation_loss(model(source["image"]), source["label"], cfg.model.aux_weight)
        ctx.backward(loss_seg)
        with ctx.autocast():
            out_t = model(target["image"])
            probs = upsampled_softmaxes(out_t, target["image"].shape[-2:], cfg.adapt.multi_level)
            ent = {k: entropy_map(p).mean() for k, p in probs.items()}
            loss_ent = sum(self.lambdas[k] * v for k, v in ent.items())
            loss_ent = loss_ent + _unused(list(out_t.aux.values())[len(ent) - 1:])
        ctx.backward(loss_ent)
        return {"seg": loss_seg.detach(), **{f"ent_{k}": v.detach() for k, v in ent.items()}}


class AdvEnt(Adversarial):
    """ADVENT's AdvEnt: AdaptSegNet's training (the `adversarial` keys, single or multi-level) whose
    discriminators see the weighted self-information map -p log2(p) / log2(C) instead of the softmax."""

    @classmethod
    def label(cls, a) -> str:
        return f"AdvEnt ({'multi' if a.multi_level else 'single'}-level, λ={a.lambda_adv:g})"

    def _softmaxes(self, output, size) -> dict[str, torch.Tensor]:
        """What the discriminators see: the self-information maps of the upsampled softmaxes."""
        return {k: self_information(p) for k, p in super()._softmaxes(output, size).items()}


# ------------------------------------------------------------------------------------------------ FDA
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
    """FDA's Charbonnier-penalised entropy: mean over pixels of ((H / ln C)^2 + eps)^eta."""
    log_p = F.log_softmax(logits.float(), dim=1)
    ent = -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])
    return ((ent * ent + eps) ** eta).mean()


class FDA(Strategy):
    """Fourier Domain Adaptation: supervised loss on source images in target style, entropy on the target.

    With `data.target.pseudo_labels` set this is the self-supervised round of FDA's SStrain.py:
    CE(source in target style) + pseudo_weight * CE(pseudo-labelled target) + entropy_weight * entropy.
    """

    needs_target = True

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
        a, aux_weight = self.cfg.adapt, self.cfg.model.aux_weight
        if a.crop is not None:  # FDA's loader: a random crop of the resized GTA5 image, the target size
            source = _random_crop(source, a.crop, _step_random(self.cfg, ctx))
        styled = fda_source_to_target(source["image"], target["image"], a.beta)
        with ctx.autocast():
            loss_seg = segmentation_loss(model(styled), source["label"], aux_weight)
        ctx.backward(loss_seg)
        losses = {"seg": loss_seg.detach()}

        use_entropy = a.entropy_weight > 0 and ctx.iteration >= a.entropy_start
        if not (use_entropy or self.self_supervised):
            return losses  # no target term yet: skip the target pass
        with ctx.autocast():
            out_t = model(target["image"])
            loss_t = _unused([] if self.self_supervised else list(out_t.aux.values()))
            if use_entropy:
                loss_ent = entropy_loss(out_t.logits, a.entropy_eta, a.entropy_eps)
                loss_t = loss_t + a.entropy_weight * loss_ent
                losses["entropy"] = loss_ent.detach()
            if self.self_supervised:
                if "label" not in target:
                    raise ValueError("data.target.pseudo_labels is set but the target batch has no `label`")
                loss_pseudo = segmentation_loss(out_t, target["label"], aux_weight)
                loss_t = loss_t + a.pseudo_weight * loss_pseudo
                losses["pseudo"] = loss_pseudo.detach()
        ctx.backward(loss_t)
        return losses


def class_mix_masks(labels: torch.Tensor, num_classes: int, fraction: float,
                    generator: torch.Generator | None = None, ignore_as_class: bool = False) -> torch.Tensor:
    """ClassMix masks [B, H, W]: per image, a random ceil(n * fraction) of the n classes in its label.

    255 is never chosen, unless `ignore_as_class`: then it counts as one more class and may be chosen (its
    pixels are pasted with label 255), as DACS's code does (`adapt.mix_ignore_as_class`).
    Vectorised on the device without host syncs: class presence by one bincount, a random subset by ranking
    random scores (absent classes score 2, after every present one).
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    ids = torch.where(flat == IGNORE_INDEX, num_classes, flat)  # 255 -> an extra column
    offsets = torch.arange(b, device=labels.device)[:, None] * (num_classes + 1)
    counts = torch.bincount((ids + offsets).reshape(-1), minlength=b * (num_classes + 1))
    columns = num_classes + 1 if ignore_as_class else num_classes  # candidates: with or without the 255 column
    present = counts.view(b, num_classes + 1)[:, :columns] > 0
    k = torch.ceil(present.sum(1) * fraction)  # classes to paste per image
    scores = torch.rand(b, columns, device=labels.device, generator=generator).masked_fill(~present, 2.0)
    rank = scores.argsort(1).argsort(1)
    chosen = rank < k[:, None]
    if not ignore_as_class:
        chosen = torch.cat([chosen, present.new_zeros(b, 1)], 1)  # 255 never chosen
    return chosen.gather(1, ids).view_as(labels)


def color_jitter(images: torch.Tensor, strength: float, p: float, generator: torch.Generator | None = None):
    """Batched colour jitter of 0-255 float images, each image jittered with probability p.

    Brightness, contrast and saturation factors in [1 - s, 1 + s] and a hue rotation of up to s of the colour
    circle (a rotation in YIQ space), in that order, clamped to [0, 255] after each, as in torchvision/kornia.
    """
    b, dev = images.shape[0], images.device
    on = torch.rand(b, device=dev, generator=generator) < p
    factors = 1 + strength * (2 * torch.rand(b, 3, device=dev, generator=generator) - 1)
    factors = torch.where(on[:, None], factors, torch.ones_like(factors))
    hue = torch.where(on, strength * (2 * torch.rand(b, device=dev, generator=generator) - 1), torch.zeros(b, device=dev))
    x = images.float()
    x = (x * factors[:, 0, None, None, None]).clamp(0, 255)
    gray = _gray(x)
    mean = gray.mean((1, 2, 3), keepdim=True)
    x = (mean + factors[:, 1, None, None, None] * (x - mean)).clamp(0, 255)
    gray = _gray(x)
    x = (gray + factors[:, 2, None, None, None] * (x - gray)).clamp(0, 255)
    angle = hue * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq = _RGB_TO_YIQ.to(dev)
    transform = torch.linalg.inv(yiq) @ rot @ yiq  # [B, 3, 3], the identity where hue = 0
    return torch.einsum("bij,bjhw->bihw", transform, x).clamp(0, 255)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def gaussian_blur(images: torch.Tensor, sigma_range, kernel_frac: float, p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched Gaussian blur, each image blurred with probability p and its own sigma ~ U(sigma_range).

    DACS's kernel: about `kernel_frac` of the image height, made odd; reflect padding. One separable grouped
    convolution for the whole batch; an image not blurred gets a delta kernel.
    """
    b, c, h, w = images.shape
    dev = images.device
    side = math.ceil(kernel_frac * h)
    size = side + 1 - side % 2  # odd
    on = torch.rand(b, device=dev, generator=generator) < p
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(b, device=dev, generator=generator)
    r = torch.arange(size, device=dev, dtype=torch.float32) - size // 2
    kernel = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = torch.where(on[:, None], kernel, (r == 0).float()[None])
    kernel = kernel.repeat_interleave(c, 0)  # [B * C, size]
    pad = size // 2
    x = F.pad(images.float().reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    return x.view(b, c, h, w)


def weighted_segmentation_loss(output, label: torch.Tensor, weight: torch.Tensor, aux_weight: float):
    """DACS's pixel-wise weighted cross-entropy: mean over all pixels of weight * CE (ignored pixels count 0)."""
    size = label.shape[-2:]
    loss = None
    for scale, logits in [(1.0, output.logits)] + [(aux_weight, v) for v in output.aux.values()]:
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="none")
        term = scale * (ce * weight).mean()
        loss = term if loss is None else loss + term
    return loss


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student, for all parameters in one fused call."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - alpha)


# ------------------------------------------------------------------------------------- DAFormer, MIC
PROTOCOL_TARGET_HEIGHT = 512  # rows of a protocol target image (Cityscapes at 1024x512), where DAFormer and MIC
#                               give their row and patch sizes


def protocol_pixels(value: int, target_height: int) -> int:
    """A length given in pixels of a 512-row target (DAFormer's 15 / 120 rows, MIC's 64 px patches) at a target
    `target_height` rows high: scaled with the height and rounded."""
    return round(value * target_height / PROTOCOL_TARGET_HEIGHT)


def pseudo_weight_map(pseudo_weight: torch.Tensor, shape, top: int, bottom: int) -> torch.Tensor:
    """DAFormer's target pixel weights [B, H, W]: the DACS scalar weight, 0 in the `top` and `bottom` rows."""
    weight = pseudo_weight.float().expand(shape).clone()
    if top > 0:
        weight[:, :top] = 0
    if bottom > 0:
        weight[:, -bottom:] = 0
    return weight


def fd_class_mask(labels: torch.Tensor, size, classes: torch.Tensor, min_ratio: float,
                  num_classes: int) -> torch.Tensor:
    """DAFormer's feature-distance mask [B, h, w] at the feature size: cells whose majority class is one of
    `classes` and covers at least `min_ratio` of the cell (ignore counts as a class of its own, never kept).

    The label's one-hot map is average-pooled to the feature grid (DAFormer's `downscale_label_ratio`, exact when
    the label size is a multiple of the feature size; adaptive pooling otherwise).
    """
    ids = torch.where(labels == IGNORE_INDEX, num_classes, labels).clamp(max=num_classes)
    one_hot = torch.zeros(labels.shape[0], num_classes + 1, *labels.shape[-2:], device=labels.device)
    one_hot.scatter_(1, ids[:, None], 1.0)
    ratio, majority = F.adaptive_avg_pool2d(one_hot, tuple(size)).max(1)
    return (ratio >= min_ratio) & torch.isin(majority, classes.to(labels.device))


def feature_distance(features: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked cells of the L2 distance between two feature maps [B, C, h, w] (0 when none is
    masked; DAFormer's mean over an empty selection would be NaN)."""
    dist = torch.linalg.vector_norm(features.float() - reference.float(), dim=1)
    weight = mask.float()
    return (dist * weight).sum() / weight.sum().clamp(min=1.0)


class ImageNetFeatureDistance:
    """DAFormer's thing-class ImageNet feature distance between the student's last backbone stage and that of a
    frozen copy of the backbone as it was built (its ImageNet, or PATH, weights), on the source images.

    The student's features come from its own source forward pass, caught by a forward hook on
    `model.backbone.layer4` while `capture()` is on. The frozen copies are held outside the strategy's modules
    on purpose: they are rebuilt identically from `model.pretrained`, so checkpoints do not carry them.
    """

    def __init__(self, model: nn.Module, classes: list[int], min_ratio: float, num_classes: int):
        stage = getattr(getattr(model, "backbone", None), "layer4", None)
        if stage is None or not hasattr(model, "input_norm"):
            raise ConfigError("adapt.fd_lambda > 0 needs a model with a ResNet backbone (model.backbone.layer4) "
                             "and model.input_norm")
        self.norm = copy.deepcopy(model.input_norm).eval()
        self.backbone = copy.deepcopy(model.backbone).eval().requires_grad_(False)
        self.classes = torch.tensor(classes)
        self.min_ratio, self.num_classes = min_ratio, num_classes
        store: dict = {}

        def keep_output(module, inputs, output):  # a closure over a dict: copies of the model stay light
            if store.get("on"):
                store["features"] = output

        self._store = store
        self._hook = stage.register_forward_hook(keep_output)

    @contextlib.contextmanager
    def capture(self):
        self._store["on"] = True
        try:
            yield
        finally:
            self._store["on"] = False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The distance for the source batch whose forward pass ran under `capture()`."""
        features = self._store.pop("features", None)
        if features is None:
            raise RuntimeError("ImageNetFeatureDistance: no features were caught; run the forward pass in capture()")
        if self.norm.scale.device != images.device:
            self.norm.to(images.device)
            self.backbone.to(images.device)
        with torch.no_grad():
            reference = resnet_features(self.backbone, self.norm(images))[1]
        mask = fd_class_mask(labels, features.shape[-2:], self.classes, self.min_ratio, self.num_classes)
        return feature_distance(features, reference, mask)


def block_mask(shape, block: int, ratio: float, device=None, generator: torch.Generator | None = None):
    """MIC's patch mask [B, 1, H, W] of `shape` (B, H, W): 1 = kept, 0 = masked. A grid of round(H / block) x
    round(W / block) patches, each masked with probability `ratio`, resized to H x W (nearest)."""
    b, h, w = shape
    grid = (max(1, round(h / block)), max(1, round(w / block)))
    keep = (torch.rand(b, 1, *grid, device=device, generator=generator) > ratio).float()
    return F.interpolate(keep, size=(h, w), mode="nearest")


def zero_pixel(model: nn.Module) -> torch.Tensor:
    """The raw RGB pixel [3] that `model.input_norm` maps to 0 (its weights' mean colour): what a masked pixel
    is in MIC, which zeroes normalised images. 0 for a model without that normalisation."""
    mode = getattr(getattr(model, "input_norm", None), "mode", None)
    if mode == "imagenet":
        return torch.tensor(IMAGENET_MEAN) * 255
    if mode == "caffe":
        return torch.tensor(CAFFE_BGR_MEAN).flip(0)
    return torch.zeros(3)


class DACS(Strategy):
    """DACS: ClassMix of source and target images, pseudo-labels from an EMA teacher, pixel-weighted CE.

    The teacher is a copy of the unwrapped model built here, so its state is in the strategy's state_dict and
    loads with the checkpoint before the first step. As in DACS it stays in training mode (batch statistics) and
    only its parameters follow the student; its buffers follow its own forward passes.

    DAFormer's options: `fd_lambda` (thing-class ImageNet feature distance on the source), `pseudo_ignore_top`
    / `pseudo_ignore_bottom` (target pixel weight 0 in those rows), `ema_alpha` 0.999; rare class sampling is
    `data.rcs`, the warm-up `train.warmup_iters`.
    """

    needs_target = True

    @classmethod
    def label(cls, a) -> str:
        return "DACS"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        src, tgt, crop = cfg.data.source.size, cfg.data.target.size, cfg.adapt.crop
        if crop is None and src != tgt:
            raise ConfigError(f"adapt.name = dacs mixes source and target pixel for pixel: data.source.size {src} "
                             f"and data.target.size {tgt} must be equal, or set adapt.crop [width, height]")
        if crop is not None and (len(crop) != 2 or crop[0] > min(src[0], tgt[0]) or crop[1] > min(src[1], tgt[1])):
            raise ConfigError(f"adapt.crop = {crop}: expected [width, height] no larger than data.source.size {src} "
                             f"and data.target.size {tgt}")
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.teacher.train()
        a = cfg.adapt
        crop_h = tgt[1] if crop is None else crop[1]
        rows = (a.pseudo_ignore_top, a.pseudo_ignore_bottom)
        self.ignore_rows = tuple(protocol_pixels(r, tgt[1]) for r in rows)
        if min(a.pseudo_ignore_top, a.pseudo_ignore_bottom) < 0 or sum(self.ignore_rows) >= crop_h:
            raise ConfigError(f"adapt.pseudo_ignore_top = {a.pseudo_ignore_top}, adapt.pseudo_ignore_bottom = "
                             f"{a.pseudo_ignore_bottom} (rows of a 512-row target; {self.ignore_rows} at "
                             f"data.target.size {tgt}): expected rows >= 0 leaving some of the {crop_h} target rows")
        self._fd = None
        if a.fd_lambda < 0 or not 0 <= a.fd_min_ratio <= 1:
            raise ConfigError(f"adapt.fd_lambda = {a.fd_lambda}, adapt.fd_min_ratio = {a.fd_min_ratio}: expected a "
                             "weight >= 0 and a ratio in [0, 1] (DAFormer: 0.005, 0.75)")
        if a.fd_lambda > 0 and not all(0 <= c < cfg.model.num_classes for c in a.fd_classes):
            raise ConfigError(f"adapt.fd_classes = {a.fd_classes}: expected class ids in [0, {cfg.model.num_classes})")
        if a.fd_lambda > 0 and cfg.model.pretrained == "none":
            print(f"adapt.fd_lambda = {a.fd_lambda} ignored: the ImageNet feature distance needs pretrained weights "
                  "(model.pretrained: imagenet or a weights file), and model.pretrained = none", flush=True)
        elif a.fd_lambda > 0:  # after the teacher's copy, so that the teacher has no hook
            self._fd = ImageNetFeatureDistance(model, a.fd_classes, a.fd_min_ratio, cfg.model.num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train()  # DACS runs its teacher in training mode throughout
        return self

    def training_step(self, model, source, target, ctx):
        a, cfg = self.cfg.adapt, self.cfg
        # Randomness from (seed, iteration) alone: the same mixes after a resume, whatever the RNG state.
        gen = torch.Generator(device=source["image"].device)
        gen.manual_seed(_step_seed(cfg, ctx))
        if a.crop is not None:  # DACS's loader: random crops of both domains, mixed pixel for pixel
            offsets = _step_random(cfg, ctx)
            source, target = _random_crop(source, a.crop, offsets), _random_crop(target, a.crop, offsets)

        fd = self._fd
        with ctx.autocast():
            with fd.capture() if fd else contextlib.nullcontext():
                out_s = model(source["image"])
            loss_src = segmentation_loss(out_s, source["label"], cfg.model.aux_weight)
            loss_fd = fd(source["image"], source["label"]) if fd else None
        del out_s
        ctx.backward(loss_src if fd is None else loss_src + a.fd_lambda * loss_fd)

        size = target["image"].shape[-2:]
        with torch.no_grad(), ctx.autocast():
            out_t = self.teacher(target["image"])
            logits_t = out_t.logits if hasattr(out_t, "logits") else out_t
            probs = F.interpolate(logits_t.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
        confidence, pseudo = probs.max(1)
        pseudo_weight = (confidence >= a.pseudo_threshold).float().mean()  # one scalar per batch, as in DACS

        mask = class_mix_masks(source["label"], cfg.model.num_classes, a.mix_fraction, gen, a.mix_ignore_as_class)
        mixed = torch.where(mask[:, None], source["image"], target["image"]).float()
        mixed = color_jitter(mixed, a.jitter_strength, a.jitter_p, gen)
        mixed = gaussian_blur(mixed, a.blur_sigma, a.blur_kernel, a.blur_p, gen)
        mixed_label = torch.where(mask, source["label"], pseudo)
        target_weight = pseudo_weight_map(pseudo_weight, pseudo.shape, *self.ignore_rows)
        weight = torch.where(mask, torch.ones_like(confidence), target_weight)

        with ctx.autocast():
            loss_mix = weighted_segmentation_loss(model(mixed), mixed_label, weight, cfg.model.aux_weight)
        ctx.backward(a.mix_weight * loss_mix)
        losses = {"seg": loss_src.detach(), "mix": loss_mix.detach(), "pseudo_weight": pseudo_weight}
        if loss_fd is not None:
            losses["fd"] = loss_fd.detach()
        losses.update(self.target_losses(model, target["image"], pseudo, target_weight, gen, ctx))
        return losses

    def target_losses(self, model, images, pseudo, weight, gen, ctx) -> dict[str, torch.Tensor]:
        """Further losses on the target batch from the teacher's pseudo-labels and their pixel weights (MIC's
        masked consistency); DACS has none."""
        return {}

    def after_step(self, model, ctx):
        if not hasattr(self, "_param_pairs"):
            student = getattr(model, "module", model)  # unwrap DDP
            self._param_pairs = (list(self.teacher.parameters()), list(student.parameters()))
        alpha = min(1.0 - 1.0 / (ctx.iteration + 1), self.cfg.adapt.ema_alpha)
        ema_update(*self._param_pairs, alpha)


class MIC(DACS):
    """MIC (Hoyer et al. 2023) on DACS with DAFormer's options: DACS's step, then masked image consistency.

    The target batch is colour-jittered and blurred as the mixed image is (`jitter_*`, `blur_*`), then patches of
    `mask_block` px (at a 512-row target; scaled with data.target.size's height) are masked, each with probability
    `mask_ratio`: set to the pixel the model normalises to 0, as MIC zeroes normalised images. The student learns
    the EMA teacher's pseudo-labels of the unmasked target, with DACS's pixel weights (rows zeroed included),
    weighted `mask_lambda`.
    """

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
        augmented = color_jitter(images.float(), a.jitter_strength, a.jitter_p, gen)
        augmented = gaussian_blur(augmented, a.blur_sigma, a.blur_kernel, a.blur_p, gen)
        keep = block_mask(pseudo.shape, self.mask_block, a.mask_ratio, images.device, gen)
        masked = torch.where(keep.bool(), augmented, self.zero_pixel.to(augmented.dtype))
        with ctx.autocast():
            loss = weighted_segmentation_loss(model(masked), pseudo, weight, self.cfg.model.aux_weight)
        ctx.backward(a.mask_lambda * loss)
        return {"masked": loss.detach()}


def _step_seed(cfg: Config, ctx) -> int:
    """A strategy's randomness is a function of (seed, iteration, rank) alone: identical after a resume,
    different on each DDP process (which holds different images)."""
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    micro = getattr(ctx, "micro_step", 0)  # gradient accumulation: each micro-batch draws its own
    return (cfg.seed * 1_000_003 + ctx.iteration) * 1024 + rank + micro * 7_919_000_003


def _step_random(cfg: Config, ctx) -> random.Random:
    return random.Random(_step_seed(cfg, ctx))  # host-side draws (crop offsets) need no device sync


def _random_crop(batch: dict, crop: list[int], rng: random.Random) -> dict:
    """An independent random [width, height] crop of each image (and label) of a batch, as DACS's loader takes."""
    (h, w), (cw, ch) = batch["image"].shape[-2:], crop
    boxes = [(rng.randint(0, h - ch), rng.randint(0, w - cw)) for _ in range(batch["image"].shape[0])]
    return {k: torch.stack([v[i, ..., y:y + ch, x:x + cw] for i, (y, x) in enumerate(boxes)])
            if k in ("image", "label") else v for k, v in batch.items()}


def _unused(outputs: list[torch.Tensor]):
    """Zero times the outputs a loss leaves out (auxiliary heads): under DDP every parameter must reach each
    backward, and this costs nothing next to the forward pass that made them."""
    return sum((0.0 * v.float().mean() for v in outputs), torch.zeros(()))


def _average_across_processes(module: nn.Module) -> None:
    """Average a strategy-owned module's gradients over DDP processes (it is not wrapped in DDP itself)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


STRATEGIES: dict[str, type[Strategy]] = {
    "none": SourceOnly,
    "adversarial": Adversarial,
    "fda": FDA,
    "dacs": DACS,
    "minent": MinEnt,
    "advent": AdvEnt,
    "mic": MIC,
}


def build_strategy(cfg: Config, model: nn.Module) -> Strategy:
    """The strategy named by `cfg.adapt.name`, built around the (unwrapped) segmentation model."""
    try:
        strategy_class = STRATEGIES[cfg.adapt.name]
    except KeyError:
        raise ConfigError(f"adapt.name = {cfg.adapt.name!r}: expected one of {', '.join(STRATEGIES)}") from None
    return strategy_class(cfg, model)


# ------------------------------------------------------------------------------------- pseudo-labels
def confidence_histogram(pred: torch.Tensor, confidence: torch.Tensor, num_classes: int, bins: int) -> torch.Tensor:
    """Counts [num_classes, bins] of the confidences of the pixels predicted as each class (one bincount)."""
    bin_index = (confidence * bins).long().clamp_(max=bins - 1)
    return torch.bincount((pred * bins + bin_index).reshape(-1), minlength=num_classes * bins).view(num_classes, bins)


def class_thresholds(histogram: torch.Tensor, percentile: float, cap: float) -> torch.Tensor:
    """Per class: the confidence at `percentile` of its pixels (FDA: sorted[round(n * 0.66)]), capped at `cap`.

    From the histogram the threshold is the lower edge of the bin holding that pixel, so at most one bin's
    width (1 / bins) below the exact value; a class never predicted gets 0, as in FDA's getSudoLabel_multi.py.
    """
    bins = histogram.shape[1]
    total = histogram.sum(1)
    rank = torch.round(total.double() * percentile).clamp(max=(total - 1).clamp(min=0).double())
    bin_of_rank = (histogram.cumsum(1) <= rank[:, None]).sum(1)  # first bin whose cumulative count exceeds rank
    threshold = bin_of_rank.double() / bins
    return torch.where(total > 0, threshold.clamp(max=cap), torch.zeros_like(threshold))


def apply_thresholds(pred: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Pseudo-labels: the prediction where its confidence reaches its class's threshold, 255 elsewhere."""
    keep = confidence >= thresholds.to(confidence.dtype)[pred]
    return torch.where(keep, pred, torch.full_like(pred, IGNORE_INDEX))


def write_pseudo_labels(cfg: Config, checkpoints: list[str], out: str | Path, bins: int = 10_000) -> Path:
    """FDA's pseudo-labels for the target train set from the mean softmax of `checkpoints` (multi-band transfer).

    Two passes over the target set: the first gathers per-class confidence histograms on the device, the second
    predicts again and writes `out/{city}/{stem}.png` (train ids, 255 = not kept), which
    `data.target.pseudo_labels: out` reads. Predicting twice avoids holding every confidence map in memory.
    """
    import dataclasses

    from PIL import Image
    from torch.utils.data import DataLoader

    from rtda.datasets import build_dataset
    from rtda.evaluation import load_models, predict_probs
    from rtda.utils.distributed import init_distributed

    a, num_classes = cfg.adapt, cfg.model.num_classes
    device = init_distributed().device
    images_only = dataclasses.replace(cfg.data.target, pseudo_labels=None)
    dataset = build_dataset(images_only, cfg, "target")
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.train.workers,
                        pin_memory=device.type == "cuda")
    models = load_models(cfg, checkpoints, device)

    def predictions():
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            # float32 whatever train.amp says: bf16 logits (8-bit mantissa) would move confidences across the
            # per-class thresholds, which sit near the 0.9 cap.
            confidence, pred = predict_probs(models, images, images.shape[-2:], amp_dtype=None).max(1)
            yield batch["name"], pred, confidence

    histogram = torch.zeros(num_classes, bins, dtype=torch.int64, device=device)
    for _, pred, confidence in predictions():
        histogram += confidence_histogram(pred, confidence, num_classes, bins)
    thresholds = class_thresholds(histogram, a.pseudo_percentile, a.pseudo_cap)

    out = Path(out)
    kept = torch.zeros((), dtype=torch.int64, device=device)
    for names, pred, confidence in predictions():
        labels = apply_thresholds(pred, confidence, thresholds)
        kept += (labels != IGNORE_INDEX).sum()
        for name, label in zip(names, labels.to(torch.uint8).cpu().numpy()):
            city = name.rsplit("_", 2)[0]  # Cityscapes stems are {city}_{seq}_{frame}
            (out / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(out / city / f"{name}.png")
    share = 100 * float(kept) / max(1, int(histogram.sum()))
    print(f"pseudo-labels for {len(dataset)} target images in {out} ({share:.1f}% of pixels kept); "
          f"per-class thresholds: {', '.join(f'{t:.3f}' for t in thresholds.tolist())}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Adaptation tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    pseudo = commands.add_parser("pseudo-labels", help="FDA pseudo-labels for the target train set from the mean "
                                 "softmax of one or more checkpoints")
    pseudo.add_argument("--config", required=True, help="YAML config (its data.target, model and adapt sections)")
    pseudo.add_argument("--checkpoint", required=True, nargs="+", help="checkpoints whose softmax is averaged")
    pseudo.add_argument("--out", required=True, help="folder for {city}/{stem}.png train-id pseudo-labels")
    pseudo.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        for path in args.checkpoint:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--checkpoint {path}: file not found")
        write_pseudo_labels(cfg, args.checkpoint, args.out)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
