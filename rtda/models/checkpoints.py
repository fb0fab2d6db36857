"""Trained weights: loading a trainer checkpoint into a model, and naming what a config or a checkpoint holds.

    model = build_untrained(cfg.model)                       # rtda.models: no backbone download, weights follow
    checkpoint = load_trained_weights(model, "runs/.../best.pt", cfg.model)   # a mismatch says what it holds
    describe(cfg.model)                                      # 'bisenet/resnet18 with 19 classes'

`backbone_name` is the one place that says which backbone a model config builds.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rtda.config import ConfigError, ModelConfig
from rtda.models.base import SegmentationModel
from rtda.utils.files import load_checkpoint, model_state_from_checkpoint


def backbone_name(model_cfg: ModelConfig) -> str:
    """The backbone `model_cfg` builds: DeepLabV2 is defined on ResNet-101, `model.backbone` is BiSeNet's choice,
    and every other network has its own (named as the network)."""
    if model_cfg.name == "deeplabv2":
        return "resnet101"
    return model_cfg.backbone if model_cfg.name == "bisenet" else model_cfg.name


def describe(model_cfg: ModelConfig) -> str:
    """The model a config builds, as errors name it: 'deeplabv2/resnet101 with 19 classes'."""
    backbone = backbone_name(model_cfg)
    name = model_cfg.name if backbone == model_cfg.name else f"{model_cfg.name}/{backbone}"
    return f"{name} with {model_cfg.num_classes} classes"


def describe_state(state: dict) -> str:
    """What a model state dict holds, from its key names and shapes: 'bisenet/resnet18 with 19 classes'."""
    def shape(key):
        value = state.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    if any(k.startswith("spatial_path.") for k in state):
        backbone = "resnet101" if "backbone.layer4.0.conv3.weight" in state else "resnet18"
        classes = (shape("classifier.weight") or ("?",))[0]
        return f"bisenet/{backbone} with {classes} classes"
    if "backbone.detail.S1.0.0.weight" in state:
        return f"bisenetv2 with {(shape('head.2.weight') or ('?',))[0]} classes"
    if "classifier.branches.0.weight" in state:
        classes = shape("classifier.branches.0.weight")[0]
        rates = sum(1 for k in state if k.startswith("classifier.branches.") and k.endswith(".weight"))
        aux = ", aux head" if any(k.startswith("aux_heads.") for k in state) else ""
        return f"deeplabv2/resnet101 with {classes} classes ({rates} ASPP rates{aux})"
    if "aux_heads.stage3.5.weight" in state:  # DDRNet (models/ddrnet.py): c = 32 slim, 64 full
        variant = "ddrnet23_slim" if shape("backbone.conv1.0.weight")[0] == 32 else "ddrnet23"
        return f"{variant} with {shape('head.5.weight')[0]} classes"
    return f"an unknown model ({len(state)} tensors, e.g. {next(iter(state), 'none')!r})"


def load_trained_weights(model: SegmentationModel, path: str | Path, model_cfg: ModelConfig | None = None) -> dict:
    """Load a trainer checkpoint (best.pt, last.pt, a snapshot) or a plain state dict into `model`, in place.

    Returns the checkpoint dict. Weights that do not fit raise one `ConfigError` line naming the file, the
    model the config builds and the model the checkpoint holds (and the config it was saved by, if recorded).
    """
    checkpoint = load_checkpoint(path)
    state = model_state_from_checkpoint(checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a model checkpoint (expected a state dict or a dict with `model`)")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        wanted = describe(model_cfg) if model_cfg is not None else describe_state(model.state_dict())
        saved_by = checkpoint.get("config_name") if isinstance(checkpoint.get("config_name"), str) else None
        raise ConfigError(f"{path}: the checkpoint holds {describe_state(state)}"
                          f"{f' (saved by config {saved_by!r})' if saved_by else ''}, but the config builds "
                          f"{wanted} ({_state_difference(model.state_dict(), state)}); "
                          "pass the config the checkpoint was trained with") from None
    return checkpoint


def _state_difference(expected: dict, got: dict) -> str:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches, e.g. {k!r} {list(got[k].shape)} vs {list(expected[k].shape)}")
    return "; ".join(parts) or "the state dict does not load"
