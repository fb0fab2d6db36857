"""DACS: ClassMix of source and target with an EMA teacher's pseudo-labels, plus DAFormer's options."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from rtda.adapt import mixing
from rtda.adapt.base import Strategy, random_crop, step_random, step_seed
from rtda.adapt.daformer import ImageNetFeatureDistance, protocol_pixels, pseudo_weight_map
from rtda.adapt.ema import ema_alpha, ema_update
from rtda.adapt.losses import segmentation_loss
from rtda.config import Config, ConfigError
from rtda.models.grid import align_corners_of, upsample


class DACS(Strategy):
    """DACS: ClassMix of source and target images, pseudo-labels from an EMA teacher, pixel-weighted CE.

    The teacher is a copy of the unwrapped model built here, so its state is in the strategy's state_dict
    (keys `teacher.*`) and loads with the checkpoint before the first step. As in DACS it stays in training
    mode (batch statistics) and only its parameters follow the student; its buffers follow its own forward
    passes.

    DAFormer's options are the `fd_*` and `pseudo_ignore_*` keys (rtda/adapt/daformer.py); rare class sampling
    is `data.rcs`, the warm-up `train.warmup_iters`. Subclasses add target losses through `target_losses`.
    """

    needs_target = True
    keys = ("crop", "mix_fraction", "mix_ignore_as_class", "mix_classes_from_batch", "ema_alpha", "pseudo_threshold",
            "jitter_strength", "jitter_p", "blur_p", "blur_sigma", "blur_kernel", "mix_weight", "fd_lambda", "fd_classes",
            "fd_min_ratio", "pseudo_ignore_top", "pseudo_ignore_bottom")

    @classmethod
    def label(cls, a) -> str:
        return "DACS"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        _check_sizes(cfg)
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.teacher.train()
        self.ignore_rows = _ignore_rows(cfg)
        # after the teacher's copy, so that the teacher has no hook
        self._fd = _feature_distance(cfg, model)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train()  # DACS runs its teacher in training mode throughout
        return self

    def training_step(self, model, source, target, ctx):
        a, cfg = self.cfg.adapt, self.cfg
        # Randomness from (seed, iteration) alone: the same mixes after a resume, whatever the RNG state.
        gen = torch.Generator(device=source["image"].device)
        gen.manual_seed(step_seed(cfg, ctx))
        if a.crop is not None:  # DACS's loader: random crops of both domains, mixed pixel for pixel
            offsets = step_random(cfg, ctx)
            source, target = random_crop(source, a.crop, offsets), random_crop(target, a.crop, offsets)

        loss_src, loss_fd = self._source_step(model, source, ctx)
        pseudo, confidence, pseudo_weight = self._pseudo_labels(target["image"], ctx)
        target_weight = pseudo_weight_map(pseudo_weight, pseudo.shape, *self.ignore_rows)
        loss_mix = self._mix_step(model, source, target, pseudo, confidence, target_weight, gen, ctx)
        losses = {"seg": loss_src.detach(), "mix": loss_mix.detach(), "pseudo_weight": pseudo_weight}
        if loss_fd is not None:
            losses["fd"] = loss_fd.detach()
        losses.update(self.target_losses(model, target["image"], pseudo, target_weight, gen, ctx))
        return losses

    def _source_step(self, model, source, ctx):
        """Supervised loss on the source (plus DAFormer's feature distance when on); backward. Returns both
        losses, the distance None when off."""
        fd = self._fd
        with ctx.autocast():
            with fd.capture() if fd else contextlib.nullcontext():
                out_s = model(source["image"])
            loss_src = segmentation_loss(model, out_s, source["label"])
            loss_fd = fd(source["image"], source["label"]) if fd else None
        del out_s
        ctx.backward(loss_src if fd is None else loss_src + self.cfg.adapt.fd_lambda * loss_fd)
        return loss_src, loss_fd

    @torch.no_grad()
    def _pseudo_labels(self, images, ctx):
        """The teacher's pseudo-labels [B, H, W] of the target, their confidences, and the batch's scalar
        pseudo-label weight: the share of pixels at or above `pseudo_threshold`, as in DACS."""
        with ctx.autocast():
            out_t = self.teacher(images)
            logits_t = out_t.logits if hasattr(out_t, "logits") else out_t
            probs = upsample(logits_t.float(), images.shape[-2:], align_corners_of(self.teacher)).softmax(1)
        return confident_pseudo_labels(probs, self.cfg.adapt.pseudo_threshold)

    def _mix_step(self, model, source, target, pseudo, confidence, target_weight, gen, ctx) -> torch.Tensor:
        """ClassMix of source into target, jittered and blurred; pixel-weighted CE on the mixed labels (source
        pixels weight 1, target pixels `target_weight`); backward. Returns the unweighted mix loss."""
        a, cfg = self.cfg.adapt, self.cfg
        mixed, mixed_label, weight = mixing.class_mix(source, target["image"], pseudo, target_weight, a,
                                                      cfg.model.num_classes, gen)
        with ctx.autocast():
            loss_mix = segmentation_loss(model, model(mixed), mixed_label, weight)
        ctx.backward(a.mix_weight * loss_mix)
        return loss_mix

    def target_losses(self, model, images, pseudo, weight, gen, ctx) -> dict[str, torch.Tensor]:
        """Further losses on the target batch from the teacher's pseudo-labels and their pixel weights (MIC's
        masked consistency); DACS has none."""
        return {}

    def after_step(self, model, ctx):
        if not hasattr(self, "_param_pairs"):
            student = getattr(model, "module", model)  # unwrap DDP
            self._param_pairs = (list(self.teacher.parameters()), list(student.parameters()))
        ema_update(*self._param_pairs, ema_alpha(ctx.iteration, self.cfg.adapt.ema_alpha))


def confident_pseudo_labels(probs: torch.Tensor, threshold: float):
    """DACS's pseudo-labels from a teacher's softmax [B, C, H, W]: the argmax [B, H, W], its confidence, and the
    batch's scalar pseudo-label weight, the share of pixels whose confidence is at or above `threshold`."""
    confidence, pseudo = probs.max(1)
    return pseudo, confidence, (confidence >= threshold).float().mean()


def _check_sizes(cfg: Config) -> None:
    """DACS mixes pixel for pixel: equal source and target sizes, or a crop that fits both."""
    src, tgt, crop = cfg.data.source.size, cfg.data.target.size, cfg.adapt.crop
    if crop is None and src != tgt:
        raise ConfigError(f"adapt.name = {cfg.adapt.name} mixes source and target pixel for pixel: data.source.size "
                          f"{src} and data.target.size {tgt} must be equal, or set adapt.crop [width, height]")
    if crop is not None and (len(crop) != 2 or crop[0] > min(src[0], tgt[0]) or crop[1] > min(src[1], tgt[1])):
        raise ConfigError(f"adapt.crop = {crop}: expected [width, height] no larger than data.source.size {src} "
                          f"and data.target.size {tgt}")


def _ignore_rows(cfg: Config) -> tuple[int, int]:
    """DAFormer's ignored (top, bottom) target rows at data.target.size, checked to leave some rows."""
    a, tgt, crop = cfg.adapt, cfg.data.target.size, cfg.adapt.crop
    crop_h = tgt[1] if crop is None else crop[1]
    rows = (a.pseudo_ignore_top, a.pseudo_ignore_bottom)
    ignore_rows = tuple(protocol_pixels(r, tgt[1]) for r in rows)
    if min(a.pseudo_ignore_top, a.pseudo_ignore_bottom) < 0 or sum(ignore_rows) >= crop_h:
        raise ConfigError(f"adapt.pseudo_ignore_top = {a.pseudo_ignore_top}, adapt.pseudo_ignore_bottom = "
                          f"{a.pseudo_ignore_bottom} (rows of a 512-row target; {ignore_rows} at "
                          f"data.target.size {tgt}): expected rows >= 0 leaving some of the {crop_h} target rows")
    return ignore_rows


def _feature_distance(cfg: Config, model: nn.Module) -> ImageNetFeatureDistance | None:
    """DAFormer's feature distance when `adapt.fd_lambda` > 0 and the model has pretrained weights, else None
    (with a printed note when it was asked for without weights)."""
    a = cfg.adapt
    if a.fd_lambda < 0 or not 0 <= a.fd_min_ratio <= 1:
        raise ConfigError(f"adapt.fd_lambda = {a.fd_lambda}, adapt.fd_min_ratio = {a.fd_min_ratio}: expected a "
                          "weight >= 0 and a ratio in [0, 1] (DAFormer: 0.005, 0.75)")
    if a.fd_lambda > 0 and not all(0 <= c < cfg.model.num_classes for c in a.fd_classes):
        raise ConfigError(f"adapt.fd_classes = {a.fd_classes}: expected class ids in [0, {cfg.model.num_classes})")
    if a.fd_lambda > 0 and cfg.model.pretrained == "none":
        print(f"adapt.fd_lambda = {a.fd_lambda} ignored: the ImageNet feature distance needs pretrained weights "
              "(model.pretrained: imagenet or a weights file), and model.pretrained = none", flush=True)
        return None
    if a.fd_lambda > 0:
        return ImageNetFeatureDistance(model, a.fd_classes, a.fd_min_ratio, cfg.model.num_classes)
    return None
