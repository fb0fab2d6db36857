"""Resizing to the protocol size and the training augmentations of the domain-shift ablation.

Images are raw RGB `uint8 [3, H, W]`, labels `uint8 [H, W]` train ids (255 = ignore) while they are
transformed; the data set turns labels into int64 at the end. Each augmentation has its own probability in
`AugmentConfig` (0 = off); geometric ones move image and label together.

    augment = build_augment(cfg.data.augment)          # None when every probability is 0
    image, label = augment_sample(augment, image, label, seed, epoch, index)

Randomness comes from torch's CPU generator, re-seeded per sample from (seed, epoch, index) inside
`fork_rng`, so the stream does not depend on the number of workers, the order samples are drawn, or a resume.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from rtda.config import AUGMENTATIONS, AugmentConfig, ConfigError
from rtda.datasets.labels import IGNORE_INDEX

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def resize_image(image: torch.Tensor, size_hw: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Bilinear (or bicubic, `data.*.interpolation`) with antialiasing, uint8 in and out; a no-op at the right size.

    Antialiased bicubic matches PIL's `resize(BICUBIC)`, what AdaptSegNet, FDA and DACS use, to 1 grey level.
    """
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"data.*.interpolation = {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image
    return TF.resize(image, list(size_hw), interpolation=INTERPOLATIONS[interpolation], antialias=True)


def resize_label(label: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest neighbour at pixel centres (PIL's NEAREST), so no new class values appear."""
    if tuple(label.shape[-2:]) == tuple(size_hw):
        return label
    return TF.resize(label[None], list(size_hw), interpolation=InterpolationMode.NEAREST_EXACT)[0]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one sample of one epoch (SeedSequence avoids seed+index collisions)."""
    state = np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def augment_sample(augment, image: torch.Tensor, label: torch.Tensor | None, seed: int, epoch: int, index: int):
    """Run `augment(image, label)` on its own generator state; the caller's RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        # Seed the CPU generator only: torch.manual_seed would also re-seed CUDA when workers=0.
        torch.default_generator.manual_seed(sample_seed(seed, epoch, index))
        return augment(image, label)


class Augment:
    """The switchable training augmentations of `AugmentConfig`, applied in the order of `STEPS`."""

    def __init__(self, cfg: AugmentConfig):
        _check(cfg)
        self.cfg = cfg
        s = cfg.jitter_strength
        self.jitter = v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s)

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None):
        # One coin per augmentation, always drawn, so each decision uses a fixed slot of the stream.
        coins = torch.rand(len(STEPS)).tolist()
        for (name, step), coin in zip(STEPS.items(), coins):
            if coin < getattr(self.cfg, name):
                image, label = step(self, image, label)
        return image, label


# ------------------------------------------------------------------------------------------------ steps
# Each step: (augment, image uint8 [3, H, W], label uint8 [H, W] or None) -> (image, label).
def _scale_crop(augment: Augment, image, label):
    """Rescale by s ~ U(scale_range), then crop back to the input size (padding image 0, label 255)."""
    height, width = image.shape[-2:]
    scale = _uniform(augment.cfg.scale_range)
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = resize_image(image, scaled)
    label = None if label is None else resize_label(label, scaled)
    pad_h, pad_w = max(height - scaled[0], 0), max(width - scaled[1], 0)
    if pad_h or pad_w:  # bottom/right padding, as mmseg does
        image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
        label = None if label is None else TF.pad(label[None], [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)[0]
    top = int(torch.randint(image.shape[-2] - height + 1, ()))
    left = int(torch.randint(image.shape[-1] - width + 1, ()))
    image = image[:, top:top + height, left:left + width]
    label = None if label is None else label[top:top + height, left:left + width]
    return image, label


def _hflip(augment: Augment, image, label):
    return image.flip(-1), None if label is None else label.flip(-1)


def _color_jitter(augment: Augment, image, label):
    return augment.jitter(image), label


def _brightness(augment: Augment, image, label):
    return TF.adjust_brightness(image, _uniform(augment.cfg.brightness_range)), label


def _blur(augment: Augment, image, label):
    sigma = _uniform(augment.cfg.blur_sigma)
    kernel = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7% of the weight
    return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma]), label


def _noise(augment: Augment, image, label):
    noisy = image.float() + augment.cfg.noise_std * torch.randn(image.shape)
    return noisy.round_().clamp_(0, 255).to(torch.uint8), label


def _grayscale(augment: Augment, image, label):
    return TF.rgb_to_grayscale(image, num_output_channels=3), label


# Augmentation name (an `AugmentConfig` probability) -> its step. The key order is the order the steps run and
# the slot of each one's coin in the per-sample stream: it is part of every augmented stream, so new
# augmentations go at the end. Geometric steps come first, then photometric.
STEPS = {
    "scale_crop": _scale_crop,
    "hflip": _hflip,
    "color_jitter": _color_jitter,
    "brightness": _brightness,
    "blur": _blur,
    "noise": _noise,
    "grayscale": _grayscale,
}
if sorted(STEPS) != sorted(AUGMENTATIONS):
    raise AssertionError(f"transforms.STEPS {sorted(STEPS)} must name exactly config.AUGMENTATIONS "
                         f"{sorted(AUGMENTATIONS)}")


def build_augment(cfg: AugmentConfig) -> Augment | None:
    """The augmentation callable of `data.augment`, or None when every probability is 0."""
    _check(cfg)
    if not any(getattr(cfg, name) > 0 for name in STEPS):
        return None
    return Augment(cfg)


def _uniform(bounds) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand(()))


def _check(cfg: AugmentConfig) -> None:
    """The settings the config loader's ranges do not cover (the probabilities are checked at load)."""
    for name, low_limit in (("scale_range", 0.0), ("blur_sigma", 0.0), ("brightness_range", 0.0)):
        value = getattr(cfg, name)
        if len(value) != 2 or not low_limit < value[0] <= value[1]:
            raise ConfigError(f"data.augment.{name} = {value}: expected [low, high] with {low_limit} < low <= high")
    if not 0.0 <= cfg.jitter_strength <= 0.5:
        raise ConfigError(f"data.augment.jitter_strength = {cfg.jitter_strength}: expected a value in [0, 0.5]")
    if cfg.noise_std < 0:
        raise ConfigError(f"data.augment.noise_std = {cfg.noise_std}: expected a standard deviation >= 0")
