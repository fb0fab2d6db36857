"""DAFormer's options of DACS: the thing-class ImageNet feature distance, the pseudo-label weight map with
ignored top and bottom rows, and the protocol's pixel lengths scaled to the configured target size."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from rtda.config import ConfigError
from rtda.datasets.labels import IGNORE_INDEX

PROTOCOL_TARGET_HEIGHT = 512  # rows of a protocol target image (Cityscapes at 1024x512), where DAFormer and MIC
#                               give their row and patch sizes


def protocol_pixels(value: int, target_height: int) -> int:
    """A length given in pixels of a 512-row target (DAFormer's 15 / 120 rows, MIC's 64 px patches) at a target
    `target_height` rows high: scaled with the height and rounded."""
    return round(value * target_height / PROTOCOL_TARGET_HEIGHT)


def pseudo_weight_map(pseudo_weight: torch.Tensor, shape, top: int, bottom: int) -> torch.Tensor:
    """DAFormer's target pixel weights [B, H, W]: the DACS scalar weight, 0 in the `top` and `bottom` rows."""
    weight = pseudo_weight.float().expand(shape).clone()
    if top > 0:
        weight[:, :top] = 0
    if bottom > 0:
        weight[:, -bottom:] = 0
    return weight


def fd_class_mask(labels: torch.Tensor, size, classes: torch.Tensor, min_ratio: float,
                  num_classes: int) -> torch.Tensor:
    """DAFormer's feature-distance mask [B, h, w] at the feature size: cells whose majority class is one of
    `classes` and covers at least `min_ratio` of the cell (ignore counts as a class of its own, never kept).

    The label's one-hot map is average-pooled to the feature grid (DAFormer's `downscale_label_ratio`, exact when
    the label size is a multiple of the feature size; adaptive pooling otherwise).
    """
    ids = torch.where(labels == IGNORE_INDEX, num_classes, labels).clamp(max=num_classes)
    one_hot = torch.zeros(labels.shape[0], num_classes + 1, *labels.shape[-2:], device=labels.device)
    one_hot.scatter_(1, ids[:, None], 1.0)
    ratio, majority = F.adaptive_avg_pool2d(one_hot, tuple(size)).max(1)
    return (ratio >= min_ratio) & torch.isin(majority, classes.to(labels.device))


def feature_distance(features: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked cells of the L2 distance between two feature maps [B, C, h, w] (0 when none is
    masked; DAFormer's mean over an empty selection would be NaN)."""
    dist = torch.linalg.vector_norm(features.float() - reference.float(), dim=1)
    weight = mask.float()
    return (dist * weight).sum() / weight.sum().clamp(min=1.0)


class ImageNetFeatureDistance:
    """DAFormer's thing-class ImageNet feature distance between the student's bottleneck features (the output of
    its `bottleneck_stage`, the last backbone stage) and those of a frozen copy of the model as it was built
    (its ImageNet, or PATH, weights), on the source images.

    The student's features come from its own source forward pass, caught by a forward hook on that stage while
    `capture()` is on. The frozen copy is held outside the strategy's modules on purpose: it is rebuilt
    identically from `model.pretrained`, so checkpoints do not carry it.
    """

    def __init__(self, model: nn.Module, classes: list[int], min_ratio: float, num_classes: int):
        path = getattr(model, "bottleneck_stage", None)
        if path is None or not hasattr(model, "input_norm"):
            raise ConfigError(f"adapt.fd_lambda > 0 compares ImageNet backbone features, which "
                              f"{type(model).__name__} does not have (no pretrained backbone stage, "
                              "`bottleneck_stage`); set adapt.fd_lambda: 0")
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)  # copied before the hooks go on
        self.classes = torch.tensor(classes)
        self.min_ratio, self.num_classes = min_ratio, num_classes
        self._store: dict = {}
        self._hooks = [net.get_submodule(path).register_forward_hook(self._keeper(key))
                       for net, key in ((model, "features"), (self.frozen, "reference"))]

    def _keeper(self, key: str):
        def keep_output(module, inputs, output):  # a closure over a dict: copies of the model stay light
            if self._store.get("on"):
                self._store[key] = output
        return keep_output

    @contextlib.contextmanager
    def capture(self):
        self._store["on"] = True
        try:
            yield
        finally:
            self._store["on"] = False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The distance for the source batch whose forward pass ran under `capture()`."""
        features = self._store.pop("features", None)
        if features is None:
            raise RuntimeError("ImageNetFeatureDistance: no features were caught; run the forward pass in capture()")
        if next(self.frozen.parameters()).device != images.device:
            self.frozen.to(images.device)
        with torch.no_grad(), self.capture():
            self.frozen.forward_logits(self.frozen.input_norm(images), with_aux=False)
        reference = self._store.pop("reference")
        mask = fd_class_mask(labels, features.shape[-2:], self.classes, self.min_ratio, self.num_classes)
        return feature_distance(features, reference, mask)
