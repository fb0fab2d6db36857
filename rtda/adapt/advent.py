"""ADVENT's two methods: MinEnt (entropy minimisation on the target) and AdvEnt (AdaptSegNet on entropy maps)."""
from __future__ import annotations

import torch
from torch import nn

from rtda.adapt.adversarial import Adversarial
from rtda.adapt.base import Strategy, check_multi_level
from rtda.adapt.losses import (
    entropy_map,
    keep_unused_in_graph,
    segmentation_loss,
    self_information,
    upsampled_softmaxes,
)
from rtda.config import Config, ConfigError


class MinEnt(Strategy):
    """ADVENT's MinEnt: supervised loss on the source, entropy minimisation on the target.

    The target term is lambda_ent * mean normalised entropy of the softmax of the upsampled main logits
    (ADVENT's entropy_loss: sum(-p log2 p) / (N H W log2 C)), plus lambda_ent_aux times the same on the first
    auxiliary output when `adapt.multi_level` is set (ADVENT: 0.001 / 0.0002).
    """

    needs_target = True
    keys = ("multi_level", "lambda_ent", "lambda_ent_aux")

    @classmethod
    def label(cls, a) -> str:
        return f"MinEnt ({'multi' if a.multi_level else 'single'}-level, λ={a.lambda_ent:g})"

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        a = cfg.adapt
        check_multi_level(cfg)
        for key in ("lambda_ent", "lambda_ent_aux"):
            if getattr(a, key) < 0:
                raise ConfigError(f"adapt.{key} = {getattr(a, key)}: expected a weight >= 0 (ADVENT: 0.001 / 0.0002)")
        self.lambdas = {"main": a.lambda_ent, "aux": a.lambda_ent_aux}

    def training_step(self, model, source, target, ctx):
        cfg = self.cfg
        with ctx.autocast():
            loss_seg = segmentation_loss(model, model(source["image"]), source["label"])
        ctx.backward(loss_seg)
        with ctx.autocast():
            out_t = model(target["image"])
            probs = upsampled_softmaxes(out_t, target["image"].shape[-2:], cfg.adapt.multi_level)
            ent = {k: entropy_map(p).mean() for k, p in probs.items()}
            loss_ent = sum(self.lambdas[k] * v for k, v in ent.items())
            loss_ent = loss_ent + keep_unused_in_graph(list(out_t.aux.values())[len(ent) - 1:])
        ctx.backward(loss_ent)
        return {"seg": loss_seg.detach(), **{f"ent_{k}": v.detach() for k, v in ent.items()}}


class AdvEnt(Adversarial):
    """ADVENT's AdvEnt: AdaptSegNet's training (the `adversarial` keys, single or multi-level) whose
    discriminators see the weighted self-information map -p log2(p) / log2(C) instead of the softmax."""

    keys = Adversarial.keys

    @classmethod
    def label(cls, a) -> str:
        return f"AdvEnt ({'multi' if a.multi_level else 'single'}-level, λ={a.lambda_adv:g})"

    def _softmaxes(self, output, size) -> dict[str, torch.Tensor]:
        """What the discriminators see: the self-information maps of the upsampled softmaxes."""
        return {k: self_information(p) for k, p in super()._softmaxes(output, size).items()}
