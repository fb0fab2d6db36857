"""Distillation of a frozen adapted teacher into a real-time student (`adapt.name: distill`).

The recipe of the lightweight-UDA papers (DAKD, CLDA, DUDA): a large network adapted first (DACS,
DAFormer-DACS, MIC), then a small student trained on the labelled source and, on the target, on the teacher's
knowledge: its pseudo-labels with DACS's confidence weight, a temperature-scaled KL on the logits, and optionally
ClassMix of source and target with the teacher's labels on the target part.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtda.adapt import mixing
from rtda.adapt.base import Strategy, random_crop, step_random, step_seed
from rtda.adapt.dacs import _check_sizes, confident_pseudo_labels
from rtda.adapt.daformer import pseudo_weight_map
from rtda.adapt.losses import segmentation_loss
from rtda.config import Config, ConfigError, load_config
from rtda.datasets.labels import IGNORE_INDEX
from rtda.models import build_untrained, load_trained_weights
from rtda.models.checkpoints import describe
from rtda.models.grid import align_corners_of, upsample
from rtda.utils.files import file_sha256


def kd_loss(student_logits: torch.Tensor, teacher_probs_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term per pixel: T^2 * KL(p_teacher || p_student) at temperature T, mean over pixels.

    `student_logits` [B, C, H, W] at the label size; `teacher_probs_t` [B, C, H, W] the teacher's softmax at
    temperature T (softmax(t / T), or its mean over test-time views). In float32; 0 log 0 counts 0.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    p = teacher_probs_t.float()
    kl = (torch.xlogy(p, p) - p * log_student).sum(1)
    return kl.mean() * temperature ** 2


class FrozenTeacher:
    """The teacher model, frozen: eval mode, no gradient, its own input size and grid, not an nn.Module attribute of
    the strategy (so neither the student's checkpoint nor the optimiser ever holds it).

    `path` and `sha256` name the weights file; the model moves to the images' device on first use.
    """

    def __init__(self, cfg: Config):
        t = cfg.adapt.teacher
        if not t.config or not t.checkpoint:
            raise ConfigError(f"adapt.name = distill needs a trained teacher: set adapt.teacher.config and "
                              f"adapt.teacher.checkpoint (now {t.config!r} and {t.checkpoint!r})")
        if not Path(t.config).is_file():
            raise ConfigError(f"adapt.teacher.config = {t.config}: config file not found")
        if not Path(t.checkpoint).is_file():
            raise ConfigError(f"adapt.teacher.checkpoint = {t.checkpoint}: file not found (train the teacher first: "
                              f"python train.py --config {t.config})")
        teacher_cfg = load_config(t.config)
        if teacher_cfg.model.num_classes != cfg.model.num_classes:
            raise ConfigError(f"adapt.teacher.config = {t.config} builds {describe(teacher_cfg.model)}, and the "
                              f"student has {cfg.model.num_classes} classes: the teacher must predict the same classes")
        self.model = build_untrained(teacher_cfg.model)
        load_trained_weights(self.model, t.checkpoint, teacher_cfg.model)  # a mismatch is one ConfigError line
        self.model.eval().requires_grad_(False)
        self.path, self.sha256 = str(t.checkpoint), file_sha256(Path(t.checkpoint))
        self.flip = t.flip
        # the teacher reads the target at its own config's size: the student's target batch is scaled by this
        (tw, th), (sw, sh) = teacher_cfg.data.target.size, cfg.data.target.size
        self.scale = (th / sh, tw / sw)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, ctx, temperature: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's softmax of raw target `images` [B, 3, H, W] at H x W, and its softmax at `temperature`
        (None: not computed), both float32 and averaged over the image and its flip with `flip`."""
        if next(self.model.parameters()).device != images.device:
            self.model.to(images.device)
        h, w = images.shape[-2:]
        size = (round(h * self.scale[0]), round(w * self.scale[1]))
        x = images.float()
        if size != (h, w):  # the teacher's input size, antialiased like the loaders' resize it was trained on
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        with ctx.autocast():
            logits = self.model(x)  # eval mode: the main logits at the input size, on the teacher's grid
        logits = logits.float()
        if logits.shape[-2:] != (h, w):
            logits = upsample(logits, (h, w), align_corners_of(self.model))
        views = logits.chunk(2) if self.flip else (logits,)
        views = [v if i == 0 else v.flip(-1) for i, v in enumerate(views)]
        probs = torch.stack([v.softmax(1) for v in views]).mean(0)
        probs_t = None if temperature is None else torch.stack([(v / temperature).softmax(1) for v in views]).mean(0)
        return probs, probs_t


class Distill(Strategy):
    """Distillation from a frozen teacher (`adapt.teacher`): per iteration the source CE, then on the target the
    teacher's pseudo-labels with DACS's confidence weight as pixel-weighted CE plus `kd_lambda` * T^2 * KL at
    temperature `kd_temperature` on the student's main logits, then with `mix` DACS's ClassMix of source and target.

    With `data.target.pseudo_labels` (labels written once for a fixed teacher by `python -m rtda.adapt.pseudo_labels`)
    no teacher is built: the target labels are the file's, the weight the batch's share of labelled pixels, and the
    KL term, which needs logits, must be off. The strategy's state holds the teacher file's path and sha256.
    """

    needs_target = True
    keys = ("teacher", "kd_lambda", "kd_temperature", "mix", "pseudo_threshold", "crop", "mix_fraction",
            "mix_ignore_as_class", "mix_classes_from_batch", "jitter_strength", "jitter_p", "blur_p", "blur_sigma",
            "blur_kernel", "mix_weight")

    @classmethod
    def label(cls, a) -> str:
        teacher = Path(a.teacher.config).stem if a.teacher.config else "cached labels"
        return f"Distill ({teacher})"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        a = cfg.adapt
        self.cached = cfg.data.target.pseudo_labels is not None
        if self.cached and (a.kd_lambda > 0 or a.teacher.flip):
            raise ConfigError(f"adapt.kd_lambda = {a.kd_lambda}, adapt.teacher.flip = {a.teacher.flip}: with cached "
                              f"labels (data.target.pseudo_labels) there are no teacher logits; set adapt.kd_lambda=0 "
                              "and adapt.teacher.flip=false, or unset data.target.pseudo_labels")
        if a.mix or a.crop is not None:
            _check_sizes(cfg)
        self.teacher = None if self.cached else FrozenTeacher(cfg)

    def training_step(self, model, source, target, ctx):
        a = self.cfg.adapt
        gen = torch.Generator(device=source["image"].device)
        gen.manual_seed(step_seed(self.cfg, ctx))
        if a.crop is not None:  # DACS's loader: random crops of both domains, mixed pixel for pixel
            offsets = step_random(self.cfg, ctx)
            source, target = random_crop(source, a.crop, offsets), random_crop(target, a.crop, offsets)
        with ctx.autocast():
            loss_src = segmentation_loss(model, model(source["image"]), source["label"])
        ctx.backward(loss_src)

        pseudo, probs_t, pseudo_weight = self._teacher_labels(target, ctx)
        weight = pseudo_weight_map(pseudo_weight, pseudo.shape, 0, 0)
        with ctx.autocast():
            out_t = model(target["image"])
            loss_pseudo = segmentation_loss(model, out_t, pseudo, weight)
            loss_t = loss_pseudo
            if probs_t is not None:
                logits = upsample(out_t.logits.float(), pseudo.shape[-2:], out_t.align_corners)
                loss_kd = kd_loss(logits, probs_t, a.kd_temperature)
                loss_t = loss_t + a.kd_lambda * loss_kd
        ctx.backward(loss_t)
        losses = {"seg": loss_src.detach(), "pseudo": loss_pseudo.detach(), "pseudo_weight": pseudo_weight}
        if probs_t is not None:
            losses["kd"] = loss_kd.detach()
        if a.mix:
            mixed, mixed_label, mixed_weight = mixing.class_mix(source, target["image"], pseudo, weight, a,
                                                                self.cfg.model.num_classes, gen)
            with ctx.autocast():
                loss_mix = segmentation_loss(model, model(mixed), mixed_label, mixed_weight)
            ctx.backward(a.mix_weight * loss_mix)
            losses["mix"] = loss_mix.detach()
        return losses

    def _teacher_labels(self, target, ctx):
        """(pseudo-labels [B, H, W], the teacher's softmax at the KD temperature or None, the batch's scalar
        pseudo-label weight) from the teacher, or from the cached label files."""
        a = self.cfg.adapt
        if self.cached:
            if "label" not in target:
                raise ValueError("data.target.pseudo_labels is set but the target batch has no `label`")
            pseudo = target["label"].long()
            return pseudo, None, (pseudo != IGNORE_INDEX).float().mean()
        probs, probs_t = self.teacher(target["image"], ctx, a.kd_temperature if a.kd_lambda > 0 else None)
        pseudo, _, pseudo_weight = confident_pseudo_labels(probs, a.pseudo_threshold)
        return pseudo, probs_t, pseudo_weight

    # The teacher is not in the checkpoint; its file's identity is, and a resume with another file stops.
    def get_extra_state(self):
        if self.teacher is None:
            return {"teacher_checkpoint": None, "teacher_sha256": None}
        return {"teacher_checkpoint": self.teacher.path, "teacher_sha256": self.teacher.sha256}

    def set_extra_state(self, state):
        mine = self.get_extra_state()
        if state.get("teacher_sha256") != mine["teacher_sha256"]:
            raise ConfigError(f"the run was trained with the teacher {state.get('teacher_checkpoint')} (sha256 "
                              f"{str(state.get('teacher_sha256'))[:12]}), and adapt.teacher.checkpoint is "
                              f"{mine['teacher_checkpoint']} (sha256 {str(mine['teacher_sha256'])[:12]}): a run keeps "
                              "its teacher; start a new run to distil another")
