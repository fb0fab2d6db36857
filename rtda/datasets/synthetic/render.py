"""Rendering: one scene of a domain as (uint8 RGB [H, W, 3], uint8 Cityscapes label ids [H, W]).

Every image is a pure function of (seed, domain, index): it draws from its own `numpy.random.Generator`
seeded with `[seed, DOMAIN_CODES[domain], index]`.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from rtda.datasets.synthetic.draw import Canvas, draw_scene
from rtda.datasets.synthetic.styles import DOMAIN_CODES, ID, STYLES, TARGET

PHOTO_NOISE_STD = 3.5  # --photo-like: sensor noise on the 0-255 scale


def _upsampled_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise with features about `cell` pixels wide, unit-ish std, float32 [H, W]."""
    small = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2)), dtype=np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def _finish(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Turn the flat drawing into the domain's photograph: texture, shadows, haze, contrast, sensor, optics.

    Everything per pixel is folded into one brightness field [H, W] and one haze-and-contrast map per row,
    so the target costs a handful of full-image passes.
    """
    st, h, w = c.style, c.h, c.w
    if not (st.texture_strength or st.shadows or st.haze[1] or st.noise[1] or st.blur[1]):
        return np.asarray(c.rgb)  # the game look: flat colours, hard edges, nothing else
    label = np.asarray(c.label)
    field = np.ones((h, w), np.float32)
    if st.texture_strength > 0:
        amp = np.zeros(256, np.float32)
        strength = st.texture_strength * (rng.random() if st.randomised else 1.0)
        for name, a in st.texture.items():
            amp[ID[name]] = a * strength
        tex = 0.6 * _upsampled_noise(rng, h, w, 4) + 0.4 * _upsampled_noise(rng, h, w, 16)
        field += amp[label] * tex
    if st.shadows:  # cast on the ground only: a nearer facade or car drawn over a shadow stays lit
        on_ground = np.zeros(256, bool)
        on_ground[[ID["road"], ID["sidewalk"], ID["terrain"]]] = True
        shade = np.asarray(c.shade, dtype=np.float32) * np.float32(1.0 / 255.0)
        field *= np.where(on_ground[label], shade, np.float32(1.0))
    # haze: far things fade into the sky colour, most at the horizon row
    rows = np.arange(h, dtype=np.float32)
    fade = (rng.uniform(*st.haze) * np.exp(-np.abs(rows - c.horizon) / (0.12 * h)))[:, None, None]
    contrast = rng.uniform(*st.contrast)
    scale = (1.0 - fade) * contrast  # [H, 1, 1]
    offset = (fade * c.base["sky"] - 128.0) * contrast + 128.0  # [H, 1, 3]
    img = np.asarray(c.rgb, dtype=np.float32)
    img *= field[..., None]
    img *= scale
    img += offset
    if st.noise[1] > 0:
        # uniform noise of the drawn std: three times cheaper to draw than Gaussian, and blurred next anyway
        std = np.float32(rng.uniform(*st.noise) * math.sqrt(12.0))
        img += (rng.random((h, w, 1), dtype=np.float32) - np.float32(0.5)) * std
    out = Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8), mode="RGB")
    if st.blur[1] > 0:
        out = out.filter(ImageFilter.BoxBlur(rng.uniform(*st.blur) * w / 512))
    return np.asarray(out)



def render_scene(domain: str, index: int, seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene of `domain` (`source`, `target` or `val`, which looks like the target): uint8 RGB [H, W, 3]
    and uint8 Cityscapes label ids [H, W]. A pure function of its arguments."""
    if domain not in DOMAIN_CODES:
        raise ValueError(f"domain {domain!r}: expected one of {', '.join(DOMAIN_CODES)}")
    rng = np.random.default_rng([seed, DOMAIN_CODES[domain], index])
    c = Canvas(rng, STYLES.get(domain, TARGET), height, width)
    draw_scene(c, rng)
    return _finish(c, rng), np.asarray(c.label)


def photo_like(image: np.ndarray, seed: int, domain: str, index: int) -> np.ndarray:
    """`image` with per-pixel Gaussian sensor noise (its own stream: the scene itself is unchanged)."""
    rng = np.random.default_rng([seed, DOMAIN_CODES[domain], index, 1])
    noisy = image.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(PHOTO_NOISE_STD)
    return np.clip(noisy, 0, 255, out=noisy).round().astype(np.uint8)
