"""Adaptation strategies: one small class per method, chosen by `adapt.name` (see docs/architecture.md).

A strategy is an nn.Module, so whatever it owns (a discriminator, an EMA teacher) travels with the checkpoint.
The trainer calls `training_step(model, source, target, ctx)` once per iteration and `after_step` after
the model's optimiser step; it knows nothing else about the method.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from datasets.labels import IGNORE_INDEX


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
    """The interface the trainer drives. Subclasses set `needs_target` and implement `training_step`."""

    needs_target = False

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        self.cfg = cfg

    @abc.abstractmethod
    def training_step(self, model, source: dict, target: dict | None, ctx) -> dict[str, torch.Tensor]:
        """Compute the losses, call `ctx.backward` on them, return them detached for logging."""

    def after_step(self, model, ctx) -> None:
        """Called after the model's optimiser step (EMA teachers update here)."""


class SourceOnly(Strategy):
    """No adaptation: supervised loss on the labelled source batch."""

    def training_step(self, model, source, target, ctx):
        with ctx.autocast():
            output = model(source["image"])
            loss = segmentation_loss(output, source["label"], self.cfg.model.aux_weight)
        ctx.backward(loss)
        return {"seg": loss.detach()}


STRATEGIES: dict[str, type[Strategy]] = {
    "none": SourceOnly,
}


def build_strategy(cfg: Config, model: nn.Module) -> Strategy:
    """The strategy named by `cfg.adapt.name`, built around the (unwrapped) segmentation model."""
    try:
        strategy_class = STRATEGIES[cfg.adapt.name]
    except KeyError:
        raise ValueError(f"adapt.name = {cfg.adapt.name!r}: expected one of {', '.join(STRATEGIES)}") from None
    return strategy_class(cfg, model)
