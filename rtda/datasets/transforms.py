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
    """The switchable training augmentations, applied geometric first, then photometric."""

    def __init__(self, cfg: AugmentConfig):
        _check(cfg)
        self.cfg = cfg
        s = cfg.jitter_strength
        self._jitter = v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s)

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None):
        cfg = self.cfg
        # One coin per augmentation, always drawn, so each decision uses a fixed slot of the stream.
        coin = torch.rand(7).tolist()
        if coin[0] < cfg.scale_crop:
            image, label = self._scale_crop(image, label)
        if coin[1] < cfg.hflip:
            image = image.flip(-1)
            label = None if label is None else label.flip(-1)
        if coin[2] < cfg.color_jitter:
            image = self._jitter(image)
        if coin[3] < cfg.brightness:
            image = TF.adjust_brightness(image, _uniform(cfg.brightness_range))
        if coin[4] < cfg.blur:
            sigma = _uniform(cfg.blur_sigma)
            kernel = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7% of the weight
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        if coin[5] < cfg.noise:
            noisy = image.float() + cfg.noise_std * torch.randn(image.shape)
            image = noisy.round_().clamp_(0, 255).to(torch.uint8)
        if coin[6] < cfg.grayscale:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        return image, label

    def _scale_crop(self, image, label):
        """Rescale by s ~ U(scale_range), then crop back to the input size (padding image 0, label 255)."""
        height, width = image.shape[-2:]
        scale = _uniform(self.cfg.scale_range)
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


def build_augment(cfg: AugmentConfig) -> Augment | None:
    """The augmentation callable of `data.augment`, or None when every probability is 0."""
    _check(cfg)
    if not any(getattr(cfg, name) > 0 for name in _PROBABILITIES):
        return None
    return Augment(cfg)


_PROBABILITIES = AUGMENTATIONS


def _uniform(bounds) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand(()))


def _check(cfg: AugmentConfig) -> None:
    for name in _PROBABILITIES:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.augment.{name} = {value}: expected a probability in [0, 1]")
    for name, low_limit in (("scale_range", 0.0), ("blur_sigma", 0.0), ("brightness_range", 0.0)):
        value = getattr(cfg, name)
        if len(value) != 2 or not low_limit < value[0] <= value[1]:
            raise ConfigError(f"data.augment.{name} = {value}: expected [low, high] with {low_limit} < low <= high")
    if not 0.0 <= cfg.jitter_strength <= 0.5:
        raise ConfigError(f"data.augment.jitter_strength = {cfg.jitter_strength}: expected a value in [0, 0.5]")
    if cfg.noise_std < 0:
        raise ConfigError(f"data.augment.noise_std = {cfg.noise_std}: expected a standard deviation >= 0")
