"""What every benchmark shares: its error type, the size argument, the model builder and the model's label."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rtda.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
THESIS_SIZE = (512, 1024)  # (H, W): the size of the course's FLOPs and latency numbers
MODEL_NAMES = {"deeplabv2": "DeepLabV2", "bisenet": "BiSeNet",
               "ddrnet23_slim": "DDRNet-23-slim", "ddrnet23": "DDRNet-23"}
BACKBONE_NAMES = {"resnet18": "R18", "resnet101": "R101"}


class BenchmarkError(ValueError):
    """A bad command-line value, config or run folder; the message is one line naming it."""


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024), height first."""
    h, sep, w = text.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise BenchmarkError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 512x1024")
    return int(h), int(w)


def build_model(model_cfg, source: str = "config"):
    """`models.build_model`, with an unknown model or a missing models package as one clear error."""
    try:
        from rtda import models
    except ImportError as exc:
        raise BenchmarkError(f"cannot import the models package ({exc})") from None
    try:
        return models.build_model(model_cfg)
    except (KeyError, ValueError, ConfigError) as exc:
        name = getattr(model_cfg, "name", None) or (model_cfg.get("name") if isinstance(model_cfg, dict) else None)
        raise BenchmarkError(f"{source}: cannot build model {name!r}: {exc}") from None


def without_pretrained(model_cfg):
    """`model_cfg` with no weights to load: complexity and speed do not depend on them."""
    return dataclasses.replace(model_cfg, pretrained="none")


def model_label(model_cfg) -> str:
    """'BiSeNet-R18': the model and backbone names the tables and reports print ('DDRNet-23-slim' alone)."""
    name = MODEL_NAMES.get(model_cfg.name, model_cfg.name)
    if model_cfg.name not in ("bisenet", "deeplabv2"):  # the zoo's networks are their own backbone
        return name
    return f"{name}-{BACKBONE_NAMES.get(model_cfg.backbone, model_cfg.backbone)}"
