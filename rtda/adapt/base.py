"""The strategy interface the trainer drives, and the small helpers several strategies share.

A strategy is an nn.Module, so whatever it owns (a discriminator, an EMA teacher) travels with the checkpoint.
The trainer calls `training_step(model, source, target, ctx)` once per iteration (per micro-batch when
accumulating) and `after_step` after the model's optimiser step; it knows nothing else about the method.
`ctx` is the trainer's `StepContext` (rtda/engine): iteration, micro_step, autocast, backward, zero_grad, step.
"""
from __future__ import annotations

import abc
import random

import torch
from torch import nn

from rtda.config import Config, ConfigError


class Strategy(nn.Module, abc.ABC):
    """The interface the trainer drives.

    A subclass sets `needs_target` (whether the trainer loads target batches), `keys` (every `adapt.*` field
    it reads, inherited ones included, so that each config key has a declared reader), implements
    `training_step` and names itself in tables and plots through `label(adapt_cfg)`.
    """

    needs_target = False
    keys: tuple[str, ...] = ()

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


def check_multi_level(cfg: Config) -> None:
    """Multi-level methods put their second term on the first auxiliary output: DeepLabV2 needs its aux head."""
    if cfg.adapt.multi_level and cfg.model.name == "deeplabv2" and not cfg.model.aux_head:
        raise ConfigError("adapt.multi_level = true needs an auxiliary output: set model.aux_head = true")


def step_seed(cfg: Config, ctx) -> int:
    """A strategy's randomness is a function of (seed, iteration, rank, micro-step) alone: identical after a
    resume, different on each DDP process (which holds different images) and for each micro-batch.

    The formula decides every random stream of DACS, MIC and the crops: changing it changes results.
    """
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    micro = getattr(ctx, "micro_step", 0)  # gradient accumulation: each micro-batch draws its own
    return (cfg.seed * 1_000_003 + ctx.iteration) * 1024 + rank + micro * 7_919_000_003


def step_random(cfg: Config, ctx) -> random.Random:
    """A host-side generator seeded with `step_seed`: crop offsets drawn on the host need no device sync."""
    return random.Random(step_seed(cfg, ctx))


def random_crop(batch: dict, crop: list[int], rng: random.Random) -> dict:
    """An independent random [width, height] crop of each image (and label) of a batch, as DACS's loader takes.

    Other entries of the batch pass through unchanged. Offsets are drawn per image, (row, column) in turn.
    """
    (h, w), (cw, ch) = batch["image"].shape[-2:], crop
    boxes = [(rng.randint(0, h - ch), rng.randint(0, w - cw)) for _ in range(batch["image"].shape[0])]
    return {k: torch.stack([v[i, ..., y:y + ch, x:x + cw] for i, (y, x) in enumerate(boxes)])
            if k in ("image", "label") else v for k, v in batch.items()}
