"""Segmentation models for real-time domain adaptation, built from the `model` section of a config.

    from rtda.models import build_model, deploy
    model = build_model(cfg.model)        # or a mapping: {"name": "bisenet", "backbone": "resnet18"}
    out = model(images)                   # raw 0-255 RGB; train: SegOutput(logits, aux), eval: full-size logits
    groups = model.param_groups()         # {"backbone": [...], "head": [...]}
    fast = deploy(model)                  # eval-only inference copy
    model = build_untrained(cfg.model)    # no backbone weights loaded: a checkpoint follows (models/checkpoints.py)

The contract is docs/architecture.md's "Models" section.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from rtda.config import ConfigError, ModelConfig, from_dict
from rtda.models.base import SegmentationModel, SegOutput
from rtda.models.bisenet import BiSeNet
from rtda.models.bisenetv2 import BiSeNetV2
from rtda.models.checkpoints import backbone_name, describe, load_trained_weights
from rtda.models.ddrnet import build_ddrnet23, build_ddrnet23_slim
from rtda.models.deeplabv2 import DeepLabV2
from rtda.models.deploy import deploy
from rtda.models.losses import Ohem
from rtda.models.pidnet import PIDNet
from rtda.models.resnet import load_backbone_weights
from rtda.models.stdc import STDCSeg

__all__ = ["MODELS", "SegOutput", "SegmentationModel", "backbone_name", "build_model", "build_untrained", "deploy",
           "describe", "load_trained_weights"]


def build_deeplabv2(cfg: ModelConfig) -> DeepLabV2:
    # DeepLabV2 is defined on ResNet-101 (checkpoints.backbone_name); `backbone` chooses BiSeNet's context path only.
    return DeepLabV2(cfg.num_classes, cfg.aspp_dilations, cfg.aux_head,
                     freeze_bn=True if cfg.freeze_bn is None else cfg.freeze_bn,
                     resnet_variant=cfg.resnet_variant, input_norm=cfg.input_norm)


def build_bisenet(cfg: ModelConfig) -> BiSeNet:
    if cfg.aux_head:
        raise ConfigError("model.aux_head is a DeepLabV2 option; BiSeNet always has its two auxiliary heads")
    return BiSeNet(cfg.backbone, cfg.num_classes, freeze_bn=bool(cfg.freeze_bn),
                   resnet_variant=cfg.resnet_variant, input_norm=cfg.input_norm)


def build_stdc(cfg: ModelConfig) -> STDCSeg:
    if cfg.aux_head:
        raise ConfigError("model.aux_head is a DeepLabV2 option; STDC-Seg always has its aux and detail heads")
    return STDCSeg(cfg.name, cfg.num_classes, freeze_bn=bool(cfg.freeze_bn), input_norm=cfg.input_norm)


def build_pidnet(cfg: ModelConfig) -> PIDNet:
    if cfg.aux_head:
        raise ConfigError("model.aux_head is a DeepLabV2 option; PIDNet always has its P-branch and boundary heads")
    return PIDNet(cfg.name, cfg.num_classes, freeze_bn=bool(cfg.freeze_bn), input_norm=cfg.input_norm)


def build_bisenetv2(cfg: ModelConfig) -> BiSeNetV2:
    # trained from scratch, as its paper; a whole trained network is a checkpoint, not a backbone file
    if cfg.pretrained != "none":
        raise ConfigError(f"model.pretrained = {cfg.pretrained}: BiSeNetV2 trains from scratch and has no ImageNet "
                          "weights to load; use none (a trained bisenetv2 is read by eval.py --checkpoint, "
                          "train.py --resume)")
    for key in ("aux_head", "freeze_bn"):  # its four booster heads are always built; its BN trains from scratch
        if getattr(cfg, key):
            raise ConfigError(f"model.{key} = true: not a BiSeNetV2 option (its four booster heads are always "
                              "built, its BN layers train from scratch); leave it unset")
    return BiSeNetV2(cfg.num_classes, input_norm=cfg.input_norm)


MODELS = {"deeplabv2": build_deeplabv2, "bisenet": build_bisenet, "bisenetv2": build_bisenetv2, "stdc1": build_stdc,
          "stdc2": build_stdc, "ddrnet23_slim": build_ddrnet23_slim, "ddrnet23": build_ddrnet23,
          "pidnet_s": build_pidnet, "pidnet_m": build_pidnet}


def build_model(cfg: ModelConfig | Mapping) -> SegmentationModel:
    """The model named by `cfg.name`, its backbone loaded from `cfg.pretrained` (none | imagenet | PATH)."""
    if isinstance(cfg, Mapping):
        cfg = from_dict({"model": dict(cfg)}, source="model config").model
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model takes the `model` section of a config (ModelConfig or a mapping), "
                        f"got {type(cfg).__name__}")
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes = {cfg.num_classes}: expected a positive number of classes")
    if cfg.pretrained == "imagenet" and (cfg.resnet_variant, cfg.input_norm) != ("v1.5", "imagenet"):
        raise ConfigError("model.pretrained = imagenet loads torchvision weights, which need "
                         "model.resnet_variant: v1.5 and model.input_norm: imagenet")
    model = MODELS[cfg.name](cfg)
    # the logits' resize grid and the supervised loss's recipe (SegmentationModel.__init__ says why here)
    model.align_corners, model.aux_weight = cfg.align_corners, cfg.aux_weight
    model.ohem = None if cfg.ohem_thresh is None else Ohem(cfg.ohem_thresh, cfg.ohem_min_kept)
    caffe_setup = cfg.resnet_variant == "v1" and cfg.input_norm == "caffe"
    load_backbone_weights(model.backbone, cfg.pretrained, backbone_name(cfg), caffe_setup,
                          convert=model.convert_pretrained)
    return model


def build_untrained(cfg: ModelConfig) -> SegmentationModel:
    """`cfg`'s model with no pretrained backbone loaded (`model.pretrained` = none), for a checkpoint to fill:
    the checkpoint has every weight, so nothing is downloaded or read twice."""
    return build_model(dataclasses.replace(cfg, pretrained="none"))
