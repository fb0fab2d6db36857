"""Reading the PNGs of the GTA5 and Cityscapes layouts, with errors that name the file.

Images are decoded with PIL into raw RGB `uint8 [3, H, W]` tensors; label PNGs are read as their stored
index values (palettised GTA5 labels included: never `convert('RGB')` a label).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)  # what PIL raises on broken files


class DatasetError(ValueError):
    """A data set folder, file or value that is not what the loader expects."""


def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to raw RGB pixels, `uint8 [3, H, W]` (a channels-last view: fast to resize)."""
    try:
        with Image.open(path) as img:
            pixels = np.array(img.convert("RGB") if img.mode != "RGB" else img)  # .load() happens here
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"{path}: unreadable or truncated image ({exc})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def read_label_png(path: Path) -> np.ndarray:
    """The stored values of a single-channel label PNG (mode L, or P: the palette indices), `uint8 [H, W]`."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            values = np.array(img) if mode in ("L", "P") else None
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"{path}: unreadable or truncated label PNG ({exc})") from None
    if values is None:
        raise DatasetError(f"{path}: label PNG has mode {mode!r}, expected a single-channel 8-bit PNG of "
                           "label ids (mode 'L', or palettised 'P')")
    return values


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR header: 24 bytes read, no decoding."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DatasetError(f"{path}: not a PNG file (no PNG signature and IHDR header)")
    return struct.unpack(">II", head[16:24])
