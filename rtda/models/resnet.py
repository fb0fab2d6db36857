"""ResNet backbones built from torchvision, and loading their pretrained weights strictly.

    backbone = build_resnet("resnet101", variant="v1", dilation=(2, 4))
    load_backbone_weights(backbone, "imagenet" | "path/to/file.pth", "resnet101")

The backbone is torchvision's `ResNet` without its classifier (`avgpool`, `fc`), so its state-dict keys are
torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer1.0.downsample.0/1`), which are also the key names
of the caffe-converted DeepLab ResNet files.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from rtda.config import ConfigError

# name -> (torchvision builder, its ImageNet weights, channels of layer3 (16x) and layer4 (32x) features)
RESNETS = {
    "resnet18": (tv_resnet.resnet18, tv_resnet.ResNet18_Weights.IMAGENET1K_V1, 256, 512),
    "resnet101": (tv_resnet.resnet101, tv_resnet.ResNet101_Weights.IMAGENET1K_V1, 1024, 2048),
}
# Keys of the source files that are not part of the backbone: ImageNet classifier (fc) and the DeepLab
# classifiers (layer5 = ASPP, layer6 = the second head of the multi-level model).
_CLASSIFIER_PREFIXES = ("fc.", "layer5.", "layer6.")
_WRAPPER_PREFIXES = ("Scale.", "module.")  # caffe-converted DeepLab files; DataParallel checkpoints
# The caffe DeepLab init files the published DeepLabV2 rows start from (configs/*_paper.yaml, docs/recipes.md):
# file name -> where the paper's code gets it.
DEEPLAB_INIT_FILES = {
    "DeepLab_resnet_pretrained_init-f81d91e8.pth": "AdaptSegNet's train_gta2cityscapes_multi.py (RESTORE_FROM) "
    "downloads it from http://vllab.ucmerced.edu/ytsai/CVPR18/DeepLab_resnet_pretrained_init-f81d91e8.pth",
    "DeepLab_init.pth": "FDA's README (--init-weights) links it at "
    "https://drive.google.com/file/d/1dk_4JJZBj4OZ1mkfJ-iLLWPIulQqvHQd/view",
    "resnet101COCO-41f33a49.pth": "DACS's trainUDA.py (\"pretrained\": \"coco\") downloads it from "
    "http://vllab1.ucmerced.edu/~whung/adv-semi-seg/resnet101COCO-41f33a49.pth",
}


def build_resnet(name: str, variant: str = "v1.5", dilation: tuple[int, int] = (1, 1)) -> tv_resnet.ResNet:
    """torchvision ResNet `name` without classifier, randomly initialised.

    `variant`: where a downsampling bottleneck strides. `v1.5` is torchvision's (in the 3x3 conv); `v1` is
    the original ResNet and the caffe DeepLab weights (in the first 1x1 conv, and a ceil-mode max-pool as in
    caffe). `dilation`: the dilation of layer3 and layer4 (1, 2 or 4) replacing their stride, for dense heads.
    """
    if name not in RESNETS:
        raise ValueError(f"backbone {name!r}: expected one of {', '.join(RESNETS)}")
    if variant not in ("v1", "v1.5"):
        raise ValueError(f"resnet_variant {variant!r}: expected 'v1' or 'v1.5'")
    builder = RESNETS[name][0]
    net = builder(weights=None, replace_stride_with_dilation=[False, dilation[0] > 1, dilation[1] > 1])
    del net.avgpool, net.fc
    # torchvision gives the first block of a dilated layer the previous layer's dilation; DeepLab dilates
    # every block of the layer (res4a/res5a included). Same weights, different receptive field.
    for layer, rate in ((net.layer3, dilation[0]), (net.layer4, dilation[1])):
        if rate > 1:
            layer[0].conv2.dilation = layer[0].conv2.padding = (rate, rate)
    if variant == "v1":
        net.maxpool.ceil_mode = True
        for layer in (net.layer2, net.layer3, net.layer4):
            block = layer[0]
            if isinstance(block, tv_resnet.Bottleneck) and block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return net


def resnet_features(net: tv_resnet.ResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer3 and layer4 features of a backbone from `build_resnet`."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer3(net.layer2(net.layer1(x)))
    return x, net.layer4(x)


def load_backbone_weights(net: nn.Module, pretrained: str, name: str, caffe_setup: bool = False,
                          convert: Callable[[dict, str], dict] | None = None) -> int:
    """Load `pretrained` (`none`, `imagenet` or a file path) into `net`; return the number of tensors loaded.

    `convert(state, path)`, for backbones whose authors publish their own ImageNet files (STDC, DDRNet, PIDNet),
    maps the file's keys onto `net`'s (raising ConfigError, naming the file and what it holds, when they do not
    fit); those backbones have no torchvision weights, so `imagenet` is an error that names the file to get.

    Every backbone tensor must be present with its shape, and no unknown tensor may be left over: a partial
    load is an error, never a warning. BN `num_batches_tracked` counters may be absent (old files lack them).
    A caffe-converted DeepLab file (`Scale.` keys or a `layer5` classifier) needs `caffe_setup`, i.e. the
    model built with `resnet_variant: v1` and `input_norm: caffe`, the convention its weights were trained in.
    """
    if pretrained == "none":
        return 0
    if convert is not None:
        if pretrained == "imagenet":
            raise ConfigError(f"model.pretrained = imagenet: torchvision has no {name} weights; set model.pretrained "
                              f"to the authors' ImageNet file (README, 'Pretrained weights')")
        state = convert(_read_state_dict(Path(pretrained)), pretrained)
        return _load_checked(net, state, name, pretrained)
    if pretrained == "imagenet":
        state, source = _torchvision_imagenet_state(name), f"torchvision ImageNet weights of {name}"
    else:
        state, source = _read_state_dict(Path(pretrained)), pretrained
        if not caffe_setup and any(k.startswith(("Scale.", "layer5.")) for k in state):
            raise ConfigError(f"model.pretrained = {source}: a caffe-converted DeepLab file; set "
                             "model.resnet_variant: v1 and model.input_norm: caffe to match its weights")
    return _load_checked(net, _backbone_entries(state), name, source)


def _load_checked(net: nn.Module, state: dict, name: str, source: str) -> int:
    """Load `state` into `net` when every tensor is there with its shape and nothing else is; else ConfigError."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ConfigError(f"model.pretrained = {source}: {len(keys)} {problem} backbone tensors for {name}: "
                              f"{shown}")
    net.load_state_dict(state, strict=False)  # strict checks done above, with a clearer message
    print(f"model.pretrained: loaded {len(state)} backbone tensors from {source}", flush=True)
    return len(state)


def _backbone_entries(state: dict) -> dict[str, torch.Tensor]:
    """Map a torchvision or caffe-converted DeepLab state dict onto the backbone's key names."""
    entries = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(_CLASSIFIER_PREFIXES):
            entries[key] = value
    return entries


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        origin = DEEPLAB_INIT_FILES.get(path.name)
        if origin is not None:  # one line: where the paper's code gets the file, and where it goes
            raise FileNotFoundError(f"model.pretrained = {path}: no such file; {origin}: put it at "
                                    f"{path.absolute()} (or point model.pretrained at your copy)")
        raise FileNotFoundError(f"model.pretrained = {path}: no such file (expected none, imagenet or a weights file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with arbitrary objects, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.pretrained = {path}: not a readable PyTorch state dict ({first})") from None
    for key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained = {path}: expected a state dict of tensors")
    return state


def _torchvision_imagenet_state(name: str) -> dict:
    weights = RESNETS[name][1]
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # offline: URLError / OSError / HTTP errors
        raise ConfigError(
            f"model.pretrained = imagenet: could not get the torchvision {name} weights ({exc}). "
            f"Offline, download {weights.url} elsewhere and place it at {target}"
        ) from None
