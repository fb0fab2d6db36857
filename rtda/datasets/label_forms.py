"""Label forms: how a set's label PNGs encode the classes, told from the files themselves (values and modes, not
names). Three label forms cover what users hold (README, "Data"):

    label_ids   Cityscapes label ids 0..33 in an 8-bit single-channel PNG (mode L or palettised P):
                official gtFine `*_gtFine_labelIds.png`, official GTA5 `labels/NNNNN.png`
    train_ids   train ids 0..18 and 255 = ignore, single-channel: `*_gtFine_labelTrainIds.png`
                (cityscapesscripts' createTrainIdLabelImgs, the course zip), GTA5 sets re-saved as train ids
    color       RGB(A) colours of the Cityscapes palette: the course GTA5 subset and other colour re-saves

`detect_label_form` reads up to `SAMPLE_FILES` evenly spaced label files and keeps the label form that fits the
most of them; values that fit two label forms alike (every value in 0..18, no 255) are settled by the file
names' hint, then by the palette of palettised files, else they are an error listing the candidates (the
config key `data.<role>.label_form` overrides the detection). `decode_train_ids` reads one file in a label form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rtda.datasets.io import DatasetError, pil_decode, read_label_colour, read_label_png
from rtda.datasets.labels import (
    IGNORE_INDEX,
    LABEL_ID_COLOURS,
    MAX_LABEL_ID,
    NUM_CLASSES,
    PALETTE,
    check_train_ids,
    colours_to_train_ids,
    label_ids_to_train_ids,
)

LABEL_FORMS = ("label_ids", "train_ids", "color")
DESCRIPTIONS = {
    "label_ids": f"Cityscapes label ids 0..{MAX_LABEL_ID} (single-channel 8-bit PNG, mode L or P)",
    "train_ids": f"train ids 0..{NUM_CLASSES - 1} and {IGNORE_INDEX} = ignore (single-channel 8-bit PNG)",
    "color": "RGB colours of the Cityscapes palette",
}
SHORT = {"label_ids": "label ids", "train_ids": "train ids", "color": "colours of the Cityscapes palette"}
# PNG colour types (IHDR) each label form is stored in: 0 greyscale, 2 RGB, 3 palettised, 6 RGBA; all 8-bit
PNG_COLOUR_TYPES = {"label_ids": (0, 3), "train_ids": (0, 3), "color": (2, 6, 3)}
SAMPLE_FILES = 16
MIN_ON_PALETTE = 0.5  # an RGB label with fewer pixels in Cityscapes colours than this is not a colour label


def looked_for() -> str:
    return "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items())


@dataclass
class Evidence:
    """What one sampled label file looks like, and which label forms it fits."""

    path: Path
    summary: str
    fits: set[str] = field(default_factory=set)
    palette_says: str | None = None  # for palettised files: the label form the palette's colours match, if any


@dataclass
class Detection:
    label_form: str
    sampled: int
    notes: list[str] = field(default_factory=list)


def _show(values: np.ndarray) -> str:
    shown = ", ".join(map(str, values[:8].tolist()))
    return f"values {shown}{', ...' if len(values) > 8 else ''} ({len(values)} distinct)"


def _sample_pixels(img: Image.Image) -> np.ndarray | None:
    """Single-channel files as stored, RGB(A) as RGB, other modes None."""
    if img.mode in ("L", "P"):
        return np.array(img)
    if img.mode in ("RGB", "RGBA"):
        return np.array(img.convert("RGB"))
    return None


def inspect_label(path: Path) -> Evidence:
    """Decode one label file and say which label forms its mode and values fit."""
    try:
        mode, palette, pixels = pil_decode(path, "label PNG", _sample_pixels)
    except DatasetError as exc:
        cause = exc.__context__  # PIL's own error
        return Evidence(path, "missing" if isinstance(cause, FileNotFoundError) else f"unreadable ({cause})")
    if pixels is None:
        return Evidence(path, f"mode {mode!r}")
    if mode in ("RGB", "RGBA"):
        rgb = pixels
        _, off = colours_to_train_ids(rgb)
        on = 1.0 - off / max(rgb.shape[0] * rgb.shape[1], 1)
        summary = f"mode {mode}, {100 * on:.1f}% of pixels in Cityscapes colours"
        return Evidence(path, summary, {"color"} if on >= MIN_ON_PALETTE else set())
    present = np.flatnonzero(np.bincount(pixels.ravel(), minlength=256))
    evidence = Evidence(path, f"mode {mode}, {_show(present)}")
    if present.max(initial=0) <= MAX_LABEL_ID:
        evidence.fits.add("label_ids")
    if np.all((present < NUM_CLASSES) | (present == IGNORE_INDEX)):
        evidence.fits.add("train_ids")
    if palette is not None and len(evidence.fits) == 2:
        colours = np.array(palette, dtype=np.uint8).reshape(-1, 3)
        used = present[present < len(colours)]
        if len(used) == len(present):
            if np.array_equal(colours[used], LABEL_ID_COLOURS[used]):
                evidence.palette_says = "label_ids"
            elif np.array_equal(colours[used], PALETTE[used]):
                evidence.palette_says = "train_ids"
    return evidence


def sample_paths(paths: list[Path], count: int = SAMPLE_FILES) -> list[Path]:
    if len(paths) <= count:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]


def detect_label_form(paths: list[Path], what: str, key: str, hint: str | None = None) -> Detection:
    """The label form of the label files `paths` (a set named `what` in messages; `key` is the override key).

    `hint`: the label form the file names suggest (Cityscapes' suffixes), used only to settle values that fit
    two label forms alike, and reported when the values contradict it."""
    evidence = [inspect_label(path) for path in sample_paths(paths)]
    fitting = [e for e in evidence if e.fits]
    if not fitting:
        first = evidence[0]
        raise DatasetError(f"{first.path}: {first.summary}: the labels of {what} fit none of the label forms "
                           f"looked for ({looked_for()}); set {key} to read them in one of these")
    counts = {form: sum(form in e.fits for e in fitting) for form in LABEL_FORMS}
    best = max(counts.values())
    candidates = [form for form in LABEL_FORMS if counts[form] == best]
    notes = []
    if len(candidates) == 1:
        label_form = candidates[0]
    elif hint in candidates:
        label_form = hint
        notes.append(f"values fit {' and '.join(candidates)} alike; {hint} taken from the file names")
    else:
        palettes = {e.palette_says for e in fitting}
        if len(palettes) == 1 and None not in palettes and palettes <= set(candidates):
            label_form = palettes.pop()
            notes.append(f"values fit {' and '.join(candidates)} alike; {label_form} taken from the PNG palette")
        else:
            raise DatasetError(f"{what}: the sampled label files ({fitting[0].path}: {fitting[0].summary}) fit "
                               f"{' and '.join(candidates)} alike ({'; '.join(DESCRIPTIONS[c] for c in candidates)}); "
                               f"set {key} to one of: {', '.join(candidates)}")
    if hint is not None and label_form != hint:
        notes.append(f"the file names suggest {hint}, but the values are {label_form}; reading {label_form}")
    misfits = [e for e in evidence if label_form not in e.fits]
    if misfits:
        notes.append(f"{len(misfits)} of {len(evidence)} sampled files do not fit {label_form} and will fail when "
                     f"read (first: {misfits[0].path}: {misfits[0].summary})")
    return Detection(label_form, len(evidence), notes)


def decode_train_ids(path: Path, label_form: str) -> tuple[np.ndarray, int]:
    """(uint8 train ids [H, W] at the stored size, number of off-palette pixels read as 255) of one label file."""
    if label_form == "label_ids":
        return label_ids_to_train_ids(read_label_png(path), path), 0
    if label_form == "train_ids":
        return check_train_ids(read_label_png(path), path), 0
    if label_form == "color":
        return colours_to_train_ids(read_label_colour(path))
    raise ValueError(f"label encoding {label_form!r}: expected one of {', '.join(LABEL_FORMS)}")
