"""Reading the PNGs of the GTA5 and Cityscapes layouts, with errors that name the file.

Images are decoded into raw RGB `uint8 [3, H, W]` tensors; label PNGs are read as their stored index values
(palettised GTA5 labels included: never `convert('RGB')` an id label) or, for colour labels, as RGB.
8-bit RGB and greyscale PNGs go through `pyspng` when it is installed (the same pixels: PNG is lossless);
everything else, and everything without pyspng, through PIL (`pil_decode`, the one PIL path).
`png_header` reads a file's IHDR and its last chunk without decoding: what the pre-flight check runs on.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:  # optional: `pip install pyspng`
    import pyspng as spng
except ImportError:  # pragma: no cover - exercised where pyspng is missing
    spng = None

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the (empty) end chunk every complete PNG finishes with
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)  # what PIL raises on broken files
COLOUR_TYPE_NAMES = {0: "greyscale", 2: "RGB", 3: "palettised", 4: "greyscale+alpha", 6: "RGBA"}  # PNG IHDR types
PYSPNG_HINT = "pyspng is not installed: PNGs are decoded with PIL, about 1.4x slower (pip install pyspng)"


class DatasetError(ValueError):
    """A data set folder, file or value that is not what the loader expects."""


def has_pyspng() -> bool:
    return spng is not None


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read {what} ({exc.strerror})") from None


def _spng_decode(data: bytes, path: Path, what: str, colour_type: int, fmt: str) -> np.ndarray | None:
    """Decode with pyspng when the PNG is 8-bit of `colour_type`; None when pyspng is absent or does not apply."""
    if spng is None or len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    if data[24] != 8 or data[25] != colour_type:
        return None
    try:
        return spng.load(data, format=fmt)
    except Exception as exc:  # libspng's errors (truncated, bad CRC) arrive as RuntimeError / ValueError
        raise DatasetError(f"{path}: unreadable or truncated {what} ({exc})") from None


def pil_decode(path: Path, what: str, to_array) -> tuple[str, list[int] | None, np.ndarray | None]:
    """(mode, palette of a mode-P file or None, `to_array(img)`) of the image file at `path`, decoded by PIL.

    `to_array` turns the open image into pixels, or None when its mode is not one the caller reads. A file PIL
    cannot read raises DatasetError "{path}: unreadable or truncated {what} (...)"; its `__context__` is PIL's
    exception."""
    try:
        with Image.open(path) as img:
            palette = img.getpalette() if img.mode == "P" else None
            return img.mode, palette, to_array(img)  # .load() happens inside to_array
    except DECODE_ERRORS as exc:
        raise DatasetError(f"{path}: unreadable or truncated {what} ({exc})") from None


def _as_rgb(img: Image.Image) -> np.ndarray:
    return np.array(img.convert("RGB") if img.mode != "RGB" else img)


def _single_channel(img: Image.Image) -> np.ndarray | None:
    return np.array(img) if img.mode in ("L", "P") else None


def _colour_label(img: Image.Image) -> np.ndarray | None:
    return np.array(img.convert("RGB")) if img.mode in ("RGB", "RGBA", "P") else None


def read_image(path: Path, strict: bool = False) -> torch.Tensor:
    """Decode an image file to raw RGB pixels, `uint8 [3, H, W]` (a channels-last view: fast to resize).

    `strict`: decode with PIL, which verifies the compressed stream (pyspng skips the checksums, so a file
    corrupted inside can decode to wrong pixels without an error): what the full scan `--check --images` uses."""
    pixels = None
    if not strict and str(path).lower().endswith(".png"):
        data = _read_bytes(path, "image")
        pixels = _spng_decode(data, path, "image", 2, "RGB")
    if pixels is None:
        _, _, pixels = pil_decode(path, "image", _as_rgb)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def read_label_png(path: Path) -> np.ndarray:
    """The stored values of a single-channel label PNG (mode L, or P: the palette indices), `uint8 [H, W]`."""
    values = _spng_decode(_read_bytes(path, "label PNG"), path, "label PNG", 0, "L")
    if values is not None:
        return values
    mode, _, values = pil_decode(path, "label PNG", _single_channel)
    if values is None:
        raise DatasetError(f"{path}: label PNG has mode {mode!r}, expected a single-channel 8-bit PNG of "
                           "label ids (mode 'L', or palettised 'P')")
    return values


def read_label_colour(path: Path) -> np.ndarray:
    """The colours of a colour label PNG, `uint8 [H, W, 3]` (RGB; RGBA drops alpha; P through its palette)."""
    rgb = _spng_decode(_read_bytes(path, "label PNG"), path, "label PNG", 2, "RGB")
    if rgb is not None:
        return rgb
    mode, _, rgb = pil_decode(path, "label PNG", _colour_label)
    if rgb is None:
        raise DatasetError(f"{path}: colour label PNG has mode {mode!r}, expected an 8-bit RGB (or RGBA) PNG in "
                           "the Cityscapes colours")
    return rgb


@dataclass(frozen=True)
class PngHeader:
    """What a PNG's IHDR says, and whether the file ends with the IEND chunk (else it is truncated)."""

    width: int
    height: int
    bit_depth: int
    colour_type: int
    complete: bool

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.width, self.height

    @property
    def kind(self) -> str:
        return f"{self.bit_depth}-bit {COLOUR_TYPE_NAMES.get(self.colour_type, f'colour type {self.colour_type}')}"


def png_header(path: Path) -> PngHeader:
    """IHDR (size, bit depth, colour type) and the end chunk of a PNG: 45 bytes read, no decoding."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
            size = f.seek(0, 2)
            f.seek(max(size - 12, 0))
            tail = f.read(12)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DatasetError(f"{path}: not a PNG file (no PNG signature and IHDR header)")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", head[16:26])
    return PngHeader(width, height, bit_depth, colour_type, complete=tail == _IEND)

