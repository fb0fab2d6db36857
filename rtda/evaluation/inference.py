"""Applying models to images: the softmax of one or more models, with test-time augmentation and sliding
windows (`Inference`, from the `eval` section), and the confusion matrix of models over a labelled loader.

Predictions are made at the size of the labels the loader gives: `eval.label_size: protocol` is the
configured val size, `full` the original label files. The confusion matrix stays on the device (one
bincount per batch, summed across processes) and is read once. A checkpoint ending in `.onnx` (from
`python -m rtda.models.export`) runs in ONNX Runtime instead of PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtda.config import Config, ConfigError
from rtda.evaluation.metrics import update_confusion
from rtda.models.export import OnnxModel, is_onnx_file
from rtda.models.grid import align_corners_of, upsample
from rtda.utils.amp import autocast
from rtda.utils.distributed import all_reduce_sum


@dataclass(frozen=True)
class Inference:
    """How a model is applied to an image: flip / multi-scale TTA and sliding windows (sizes are (H, W))."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, eval_cfg) -> Inference:
        """From the `eval` section; a bad value is a ConfigError naming its key."""
        scales = tuple(float(s) for s in eval_cfg.tta.scales)
        if not scales or any(not (0 < s <= 8) for s in scales):
            raise ConfigError(f"eval.tta.scales = {list(eval_cfg.tta.scales)}: expected a non-empty list of "
                              "scales in (0, 8], e.g. [0.75, 1.0, 1.25]")
        window = stride = None
        if eval_cfg.window is not None:
            window = _hw(eval_cfg.window, "eval.window")
            if eval_cfg.window_stride is None:
                stride = (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3))
            else:
                stride = _hw(eval_cfg.window_stride, "eval.window_stride")
                if stride[0] > window[0] or stride[1] > window[1]:
                    raise ConfigError(f"eval.window_stride = {eval_cfg.window_stride}: a step larger than "
                                      f"eval.window = {eval_cfg.window} leaves pixels unpredicted; expected "
                                      "each value <= the window's")
        elif eval_cfg.window_stride is not None:
            raise ConfigError("eval.window_stride is set but eval.window is null: set the window ([width, height])")
        return cls(bool(eval_cfg.tta.flip), scales, window, stride)

    @property
    def plain(self) -> bool:
        """True when this is one whole-image pass: no flip, scale 1 only, no windows."""
        return not self.flip and self.scales == (1.0,) and self.window is None

    def describe(self) -> str:
        """One line for headers and metrics.json, e.g. `TTA flip + scales [0.75, 1.0], sliding window [...]`."""
        parts = []
        if self.flip or self.scales != (1.0,):
            parts.append("TTA " + " + ".join(filter(None, ["flip" if self.flip else "",
                                                           f"scales {list(self.scales)}" if self.scales != (1.0,)
                                                           else ""])))
        if self.window:
            parts.append(f"sliding window [{self.window[1]}, {self.window[0]}] stride "
                         f"[{self.stride[1]}, {self.stride[0]}] ([width, height])")
        return ", ".join(parts) or "whole image, no TTA"


def _hw(value: list[int], key: str) -> tuple[int, int]:
    """A config [width, height] pair -> (H, W), checked."""
    if len(value) != 2 or any(v < 1 for v in value):
        raise ConfigError(f"{key} = {value}: expected [width, height] in pixels, both >= 1")
    return int(value[1]), int(value[0])


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets of windows of `window` pixels every `stride` pixels covering `length`; the last is flush with the end."""
    last = max(length - window, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def sliding_logits(model, images: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits of `images` [B, 3, H, W] from overlapping `window` (H, W) crops, averaged where they overlap.

    A window larger than the image shrinks to it (one crop = whole-image inference). Each crop's logits are
    the model's own (eval mode: at the crop's size), so nothing is resized.
    """
    height, width = images.shape[-2:]
    wh, ww = min(window[0], height), min(window[1], width)
    total = count = None
    for top in window_starts(height, wh, stride[0]):
        for left in window_starts(width, ww, stride[1]):
            logits = model(images[..., top : top + wh, left : left + ww]).float()
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], height, width)
                count = logits.new_zeros(1, 1, height, width)
            total[..., top : top + wh, left : left + ww] += logits
            count[..., top : top + wh, left : left + ww] += 1
    return total / count


@torch.no_grad()
def predict_probs(models: list[nn.Module], images: torch.Tensor, size=None,
                  amp_dtype: torch.dtype | None = None, inference: Inference | None = None) -> torch.Tensor:
    """The mean softmax of eval-mode `models` on `images` (raw 0-255), upsampled to `size` [B, C, H, W].

    With `inference`, every model also sees the flipped and rescaled images (TTA) and/or runs on sliding
    windows; all softmax maps (at `size`, or the images' size) are averaged. Logits are resized on each model's
    grid (`align_corners_of(model)`, the config's `model.align_corners`); rescaled images on align_corners=False.
    """
    inference = inference or Inference()
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    height, width = images.shape[-2:]
    probs, n = None, 0
    for model in models:
        for scale in inference.scales:
            x = images
            if scale != 1.0:
                scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
                x = F.interpolate(images.float(), size=scaled, mode="bilinear", align_corners=False)
            for flipped in (False, True) if inference.flip else (False,):
                xi = x.flip(-1) if flipped else x
                with autocast(images.device, amp_dtype):
                    if inference.window is not None:
                        logits = sliding_logits(model, xi, inference.window, inference.stride)
                    else:
                        logits = model(xi)
                logits = logits.float()
                if flipped:
                    logits = logits.flip(-1)
                if tuple(logits.shape[-2:]) != size:
                    logits = upsample(logits, size, align_corners_of(model))
                p = logits.softmax(1)
                probs = p if probs is None else probs.add_(p)
                n += 1
    return probs.div_(n)


@torch.no_grad()
def evaluate(models: list[nn.Module] | nn.Module, loader, device: torch.device, num_classes: int,
             amp_dtype: torch.dtype | None = None, on_batch=None, inference: Inference | None = None) -> torch.Tensor:
    """Score eval-mode models (their softmax averaged) on every labelled batch of `loader`.

    Returns the int64 confusion matrix [num_classes, num_classes], summed across processes.
    `on_batch(batch, pred)` sees each batch (on the device) with its train-id prediction at the label size.
    `inference`: TTA and sliding windows (default: one whole-image pass per model).
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True).long()  # uint8 from the loader
        pred = predict_probs(models, images, label.shape[-2:], amp_dtype, inference).argmax(1)
        update_confusion(confusion, pred, label)
        if on_batch is not None:
            on_batch({**batch, "image": images, "label": label}, pred)
    return all_reduce_sum(confusion)


def load_model(cfg: Config, path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """One eval-mode model and its checkpoint dict: a PyTorch checkpoint, or an ONNX file (ONNX Runtime).

    Weights of another model or an ONNX file with another number of classes: one `ConfigError` line.
    """
    from rtda.models import build_untrained, load_trained_weights

    if is_onnx_file(path):
        model = OnnxModel(path, device)
        if model.num_classes is not None and model.num_classes != cfg.model.num_classes:
            raise ConfigError(f"{path}: the ONNX model predicts {model.num_classes} classes "
                              f"({model.metadata.get('model', 'unknown model')}), the config's model.num_classes "
                              f"is {cfg.model.num_classes}; pass the config it was exported from")
        return model, {"iteration": _int_or_none(model.metadata.get("iteration"))}
    model = build_untrained(cfg.model)  # the checkpoint has every weight
    checkpoint = load_trained_weights(model, path, cfg.model)
    return model.to(device).eval(), checkpoint


def load_models(cfg: Config, checkpoints: list[str], device: torch.device) -> list[nn.Module]:
    """`load_model` on each path, in order; the checkpoint dicts are dropped."""
    return [load_model(cfg, path, device)[0] for path in checkpoints]


def _int_or_none(text) -> int | None:
    """An ONNX metadata value as an int when it is all digits, else None."""
    return int(text) if str(text).isdigit() else None
