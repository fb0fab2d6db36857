"""Adaptation strategies: one class per method and file, chosen by `adapt.name` through STRATEGIES.

Adding a method: one file with a `Strategy` subclass (its `label`, its `keys`, `training_step`), one entry in
STRATEGIES below, its config keys in `AdaptConfig` and its config files (docs/architecture.md).

    base.py         the Strategy interface; step seed, random crop
    losses.py       segmentation CE (plain or pixel-weighted), entropy maps, upsampled softmaxes
    mixing.py       DACS's and MIC's batched augmentations        ema.py        the teacher's EMA
    daformer.py     DAFormer's options of DACS                    pseudo_labels.py  FDA's pseudo-label command
    distill.py      a frozen adapted teacher into the student (pseudo-labels, KL, ClassMix)
"""
from __future__ import annotations

from torch import nn

from rtda.adapt.advent import AdvEnt, MinEnt
from rtda.adapt.adversarial import Adversarial
from rtda.adapt.base import Strategy
from rtda.adapt.dacs import DACS
from rtda.adapt.distill import Distill
from rtda.adapt.fda import FDA
from rtda.adapt.mic import MIC
from rtda.adapt.source_only import SourceOnly
from rtda.config import Config, ConfigError

__all__ = ["STRATEGIES", "Strategy", "build_strategy", "SourceOnly", "Adversarial", "MinEnt",
           "AdvEnt", "FDA", "DACS", "MIC", "Distill"]

STRATEGIES: dict[str, type[Strategy]] = {
    "none": SourceOnly,
    "adversarial": Adversarial,
    "fda": FDA,
    "dacs": DACS,
    "minent": MinEnt,
    "advent": AdvEnt,
    "mic": MIC,
    "distill": Distill,
}


def build_strategy(cfg: Config, model: nn.Module) -> Strategy:
    """The strategy named by `cfg.adapt.name`, built around the (unwrapped) segmentation model.
    Raises ConfigError for an unknown name or a key the strategy rejects."""
    try:
        strategy_class = STRATEGIES[cfg.adapt.name]
    except KeyError:
        raise ConfigError(f"adapt.name = {cfg.adapt.name!r}: expected one of {', '.join(STRATEGIES)}") from None
    return strategy_class(cfg, model)

