"""Batched GPU augmentations of DACS and MIC: ClassMix masks, colour jitter, Gaussian blur and block masks.

Each takes an optional torch.Generator, so that a strategy's draws are a function of its step seed alone, and
none syncs with the host.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rtda.datasets.labels import IGNORE_INDEX


def class_mix_masks(labels: torch.Tensor, num_classes: int, fraction: float,
                    generator: torch.Generator | None = None, ignore_as_class: bool = False,
                    from_batch: bool = False) -> torch.Tensor:
    """ClassMix masks [B, H, W]: per image, a random ceil(n * fraction) of the n classes in its label.

    255 is never chosen, unless `ignore_as_class`: then it counts as one more class and may be chosen (its
    pixels are pasted with label 255), as DACS's code does (`adapt.mix_ignore_as_class`). `from_batch`: the n
    candidates are the classes of the whole batch, each image drawing its own subset and pasting its own pixels
    of it (a drawn class absent from the image pastes nothing), as DAFormer's get_class_masks does
    (`adapt.mix_classes_from_batch`).
    Vectorised on the device without host syncs: class presence by one bincount, a random subset by ranking
    random scores (absent classes score 2, after every present one).
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    ids = torch.where(flat == IGNORE_INDEX, num_classes, flat)  # 255 -> an extra column
    offsets = torch.arange(b, device=labels.device)[:, None] * (num_classes + 1)
    counts = torch.bincount((ids + offsets).reshape(-1), minlength=b * (num_classes + 1))
    columns = num_classes + 1 if ignore_as_class else num_classes  # candidates: with or without the 255 column
    present = counts.view(b, num_classes + 1)[:, :columns] > 0
    if from_batch:
        present = present.any(0, keepdim=True).expand(b, -1)
    k = torch.ceil(present.sum(1) * fraction)  # classes to paste per image
    scores = torch.rand(b, columns, device=labels.device, generator=generator).masked_fill(~present, 2.0)
    rank = scores.argsort(1).argsort(1)
    chosen = rank < k[:, None]
    if not ignore_as_class:
        chosen = torch.cat([chosen, present.new_zeros(b, 1)], 1)  # 255 never chosen
    return chosen.gather(1, ids).view_as(labels)


def class_mix(source: dict, target_images: torch.Tensor, pseudo: torch.Tensor, target_weight: torch.Tensor, a,
              num_classes: int, generator: torch.Generator | None = None):
    """DACS's mixed batch: ClassMix of `source` (image, label) into the target images, colour-jittered and blurred.

    `a` is the `adapt` section (mix_fraction, mix_ignore_as_class, mix_classes_from_batch, jitter_*, blur_*).
    Returns (mixed float images, mixed labels: source labels where pasted and `pseudo` elsewhere, pixel weights: 1
    where pasted and `target_weight` [B, H, W] elsewhere). Draws mask, jitter and blur in that order.
    """
    mask = class_mix_masks(source["label"], num_classes, a.mix_fraction, generator, a.mix_ignore_as_class,
                           a.mix_classes_from_batch)
    mixed = torch.where(mask[:, None], source["image"], target_images).float()
    mixed = color_jitter(mixed, a.jitter_strength, a.jitter_p, generator)
    mixed = gaussian_blur(mixed, a.blur_sigma, a.blur_kernel, a.blur_p, generator)
    mixed_label = torch.where(mask, source["label"], pseudo)
    weight = torch.where(mask, torch.ones_like(target_weight), target_weight)
    return mixed, mixed_label, weight


def color_jitter(images: torch.Tensor, strength: float, p: float, generator: torch.Generator | None = None):
    """Batched colour jitter of 0-255 float images [B, 3, H, W], each image jittered with probability p.

    Brightness, contrast and saturation factors in [1 - s, 1 + s] and a hue rotation of up to s of the colour
    circle (a rotation in YIQ space), in that order, clamped to [0, 255] after each, as in torchvision/kornia.
    """
    b, dev = images.shape[0], images.device
    on = torch.rand(b, device=dev, generator=generator) < p
    factors = 1 + strength * (2 * torch.rand(b, 3, device=dev, generator=generator) - 1)
    factors = torch.where(on[:, None], factors, torch.ones_like(factors))
    hue = torch.where(on, strength * (2 * torch.rand(b, device=dev, generator=generator) - 1), torch.zeros(b, device=dev))
    x = images.float()
    x = (x * factors[:, 0, None, None, None]).clamp(0, 255)
    gray = _gray(x)
    mean = gray.mean((1, 2, 3), keepdim=True)
    x = (mean + factors[:, 1, None, None, None] * (x - mean)).clamp(0, 255)
    gray = _gray(x)
    x = (gray + factors[:, 2, None, None, None] * (x - gray)).clamp(0, 255)
    angle = hue * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq = _RGB_TO_YIQ.to(dev)
    transform = torch.linalg.inv(yiq) @ rot @ yiq  # [B, 3, 3], the identity where hue = 0
    return torch.einsum("bij,bjhw->bihw", transform, x).clamp(0, 255)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def gaussian_blur(images: torch.Tensor, sigma_range, kernel_frac: float, p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched Gaussian blur, each image blurred with probability p and its own sigma ~ U(sigma_range).

    DACS's kernel: about `kernel_frac` of the image height, made odd; reflect padding. One separable grouped
    convolution for the whole batch; an image not blurred gets a delta kernel.
    """
    b, c, h, w = images.shape
    dev = images.device
    side = math.ceil(kernel_frac * h)
    size = side + 1 - side % 2  # odd
    on = torch.rand(b, device=dev, generator=generator) < p
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(b, device=dev, generator=generator)
    r = torch.arange(size, device=dev, dtype=torch.float32) - size // 2
    kernel = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = torch.where(on[:, None], kernel, (r == 0).float()[None])
    kernel = kernel.repeat_interleave(c, 0)  # [B * C, size]
    pad = size // 2
    x = F.pad(images.float().reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    return x.view(b, c, h, w)


def block_mask(shape, block: int, ratio: float, device=None, generator: torch.Generator | None = None):
    """MIC's patch mask [B, 1, H, W] of `shape` (B, H, W): 1 = kept, 0 = masked. A grid of round(H / block) x
    round(W / block) patches, each masked with probability `ratio`, resized to H x W (nearest)."""
    b, h, w = shape
    grid = (max(1, round(h / block)), max(1, round(w / block)))
    keep = (torch.rand(b, 1, *grid, device=device, generator=generator) > ratio).float()
    return F.interpolate(keep, size=(h, w), mode="nearest")
