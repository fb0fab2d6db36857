"""The inference form of a segmentation model: eval-only, no auxiliary heads, BN folded, channels_last.

    fast = deploy(model)          # a copy; `model` is untouched
    logits = fast(images)         # = model.eval()(images) within 1e-4, in inference mode
    graph = fast.graph()          # the same computation without the inference-mode switch (export, compile)
    load_trained_weights(model, "runs/.../best.pt")   # a mismatch says what the checkpoint holds

Folding a BN layer into the conv before it removes one full read and write of every feature map, and
channels_last lets the oneDNN (CPU) and cuDNN convolutions skip their layout conversions.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rtda.config import ConfigError
from rtda.models.base import SegmentationModel, upsample
from rtda.utils.files import load_checkpoint, model_state_from_checkpoint

_BN = nn.modules.batchnorm._BatchNorm


class DeployedModel(nn.Module):
    """Wraps a folded copy of a `SegmentationModel`; forward returns the eval-mode output (full-size logits)."""

    def __init__(self, model: SegmentationModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # inference mode skips autograd bookkeeping; not while fvcore/jit traces the model (unsupported there)
        with torch.inference_mode(not torch.jit.is_tracing()):
            return self.forward_graph(images)

    def forward_graph(self, images: torch.Tensor) -> torch.Tensor:
        """The computation itself, with no grad-mode switch: what an exporter or a compiler should trace."""
        x = self.model.input_norm(images).contiguous(memory_format=torch.channels_last)
        logits, _ = self.model.forward_logits(x, with_aux=False)
        return upsample(logits, images.shape[-2:])

    def graph(self) -> nn.Module:
        """A module whose forward is `forward_graph` (sharing these weights), for torch.onnx and torch.compile."""
        return _Graph(self)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a deployed model is eval-only: train the original model and call deploy() again")
        return super().train(False)


class _Graph(nn.Module):
    def __init__(self, deployed: DeployedModel):
        super().__init__()
        self.deployed = deployed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.deployed.forward_graph(images)


def deploy(model: SegmentationModel) -> DeployedModel:
    """An eval-only copy of `model` for inference: auxiliary heads dropped, BN folded, channels_last."""
    folded = copy.deepcopy(model).eval()
    folded.aux_heads = nn.ModuleDict()
    fold_batchnorm(folded)
    left = [name for name, m in folded.named_modules() if isinstance(m, _BN)]
    if left:
        raise RuntimeError(f"deploy: BN layers without a conv before them could not be folded: {', '.join(left)}")
    for p in folded.parameters():
        p.requires_grad_(False)
    return DeployedModel(folded.to(memory_format=torch.channels_last))


def fold_batchnorm(module: nn.Module) -> None:
    """Fold every eval-mode BN into the conv before it, in place (the BN becomes an Identity).

    Recognises the two ways our models pair them: consecutive entries of an `nn.Sequential` (our blocks,
    torchvision's `downsample`) and `convN`/`bnN` attributes (torchvision's ResNet stem and blocks).
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], _BN):
                module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                module[i + 1] = nn.Identity()
    for k in ("1", "2", "3"):
        conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, _BN):
            setattr(module, f"conv{k}", fuse_conv_bn_eval(conv, bn))
            setattr(module, f"bn{k}", nn.Identity())


# ------------------------------------------------------------------------------------ trained weights
def describe_state(state: dict) -> str:
    """What a model state dict holds, from its key names and shapes: 'bisenet/resnet18 with 19 classes'."""
    def shape(key):
        value = state.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    if any(k.startswith("spatial_path.") for k in state):
        backbone = "resnet101" if "backbone.layer4.0.conv3.weight" in state else "resnet18"
        classes = (shape("classifier.weight") or ("?",))[0]
        return f"bisenet/{backbone} with {classes} classes"
    if "classifier.branches.0.weight" in state:
        classes = shape("classifier.branches.0.weight")[0]
        rates = sum(1 for k in state if k.startswith("classifier.branches.") and k.endswith(".weight"))
        aux = ", aux head" if any(k.startswith("aux_heads.") for k in state) else ""
        return f"deeplabv2/resnet101 with {classes} classes ({rates} ASPP rates{aux})"
    return f"an unknown model ({len(state)} tensors, e.g. {next(iter(state), 'none')!r})"


def load_trained_weights(model: SegmentationModel, path: str | Path, model_cfg=None) -> dict:
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
        if model_cfg is not None:
            backbone = model_cfg.backbone if model_cfg.name == "bisenet" else "resnet101"
            wanted = f"{model_cfg.name}/{backbone} with {model_cfg.num_classes} classes"
        else:
            wanted = describe_state(model.state_dict())
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
