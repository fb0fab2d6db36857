"""The 19 Cityscapes training classes and the label-id <-> train-id tables.

Everything here is derived from the official list in `cityscapesscripts.helpers.labels`, never typed by hand.
GTA5 and Cityscapes label PNGs both hold Cityscapes label ids (0..33); training uses train ids (0..18, 255 = ignore).

    train_ids = label_ids_to_train_ids(np.asarray(Image.open(path)), path)
    label_ids = train_ids_to_label_ids(prediction)      # what cityscapesscripts' evaluator reads
    rgb = colorize(train_ids)                            # [..., 3] uint8, ignore drawn black
    train_ids, off = colours_to_train_ids(rgb_label)      # colour labels (Cityscapes palette) -> train ids
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as _OFFICIAL_LABELS
from cityscapesscripts.helpers.labels import trainId2label as _TRAIN_ID_TO_LABEL

from rtda.datasets.io import DatasetError

NUM_CLASSES = 19
IGNORE_INDEX = 255
MAX_LABEL_ID = max(label.id for label in _OFFICIAL_LABELS)  # 33; 'license plate' (id -1) never appears in a PNG

_TRAIN_LABELS = [_TRAIN_ID_TO_LABEL[t] for t in range(NUM_CLASSES)]
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _TRAIN_LABELS)
PALETTE = np.array([label.color for label in _TRAIN_LABELS], dtype=np.uint8)  # [19, 3] RGB

# The official lookup (cityscapesscripts' own recipe): every id >= 0 maps to its trainId, everything else to 255.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label in _OFFICIAL_LABELS:
    if _label.id >= 0:
        ID_TO_TRAIN_ID[_label.id] = _label.trainId
# Inverse for writing evaluation PNGs: train id t -> its label id; 255 -> 0 ('unlabeled', ignored by the evaluator).
TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)
for _train_id, _label in _TRAIN_ID_TO_LABEL.items():
    if 0 <= _train_id <= 255:
        TRAIN_ID_TO_ID[_train_id] = _label.id
# 256-entry colour table: the 19 class colours, black for ignore and anything else.
_COLOURS = np.zeros((256, 3), dtype=np.uint8)
_COLOURS[:NUM_CLASSES] = PALETTE
# Colour labels (GTA5 re-saves, gtFine_color): cityscapesscripts' colour of a train class -> its train id, the
# colour of any other Cityscapes label -> 255. Two colours are shared: 'polegroup' has the colour of 'pole' and
# 'license plate' that of 'car'; a colour image cannot tell them apart, so they read as the train class.
# Any colour outside the palette is OFF_PALETTE here, counted, then ignored (255).
OFF_PALETTE = 254
COLOUR_TO_TRAIN_ID: dict[tuple[int, int, int], int] = {}
for _label in _OFFICIAL_LABELS:
    _train_id = _label.trainId if 0 <= _label.trainId < NUM_CLASSES else IGNORE_INDEX
    if COLOUR_TO_TRAIN_ID.get(tuple(_label.color), IGNORE_INDEX) == IGNORE_INDEX:
        COLOUR_TO_TRAIN_ID[tuple(_label.color)] = _train_id
# label id -> its colour (the palette official GTA5 label PNGs carry), for telling palettised forms apart
LABEL_ID_COLOURS = np.zeros((MAX_LABEL_ID + 1, 3), dtype=np.uint8)
for _label in _OFFICIAL_LABELS:
    if _label.id >= 0:
        LABEL_ID_COLOURS[_label.id] = _label.color
for _table in (PALETTE, ID_TO_TRAIN_ID, TRAIN_ID_TO_ID, _COLOURS, LABEL_ID_COLOURS):
    _table.setflags(write=False)


@functools.cache
def _colour_table() -> np.ndarray:
    """uint8 [2**24]: packed 0xRRGGBB -> train id, 255, or OFF_PALETTE (16 MB, built once per process)."""
    table = np.full(1 << 24, OFF_PALETTE, dtype=np.uint8)
    for (r, g, b), train_id in COLOUR_TO_TRAIN_ID.items():
        table[r << 16 | g << 8 | b] = train_id
    table.setflags(write=False)
    return table


def colours_to_train_ids(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8 RGB [H, W, 3] in the Cityscapes palette -> (uint8 train ids [H, W], number of off-palette pixels).

    Off-palette pixels become 255 (ignore): a stray colour (an antialiased edge, a re-save) is never a crash."""
    packed = rgb[..., 0].astype(np.uint32) << 16
    packed |= rgb[..., 1].astype(np.uint32) << 8
    packed |= rgb[..., 2]
    train_ids = _colour_table()[packed]
    off = train_ids == OFF_PALETTE
    count = int(np.count_nonzero(off))
    if count:
        train_ids[off] = IGNORE_INDEX
    return train_ids, count


def label_ids_to_train_ids(label_ids: np.ndarray, path: object = "<array>") -> np.ndarray:
    """Map a label-id map (as read from a label PNG) to uint8 train ids; `path` names the file in errors."""
    if label_ids.size and (label_ids.max() > MAX_LABEL_ID or label_ids.min() < 0):
        bad = np.unique(label_ids[(label_ids > MAX_LABEL_ID) | (label_ids < 0)])
        shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if len(bad) > 10 else "")
        raise DatasetError(f"{path}: values {shown} are not Cityscapes label ids (expected 0..{MAX_LABEL_ID})")
    return ID_TO_TRAIN_ID[label_ids]


def check_train_ids(train_ids: np.ndarray, path: object = "<array>") -> np.ndarray:
    """Return `train_ids` unchanged after checking every value is 0..18 or 255 (e.g. a pseudo-label PNG)."""
    bad_mask = (train_ids >= NUM_CLASSES) & (train_ids != IGNORE_INDEX)
    if bad_mask.any():
        bad = np.unique(train_ids[bad_mask])
        shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if len(bad) > 10 else "")
        raise DatasetError(f"{path}: values {shown} are not train ids "
                           f"(expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX})")
    return train_ids


def train_ids_to_label_ids(train_ids):
    """Train ids (numpy or torch, any shape, values 0..255) -> uint8 label ids; 255 becomes 0 ('unlabeled')."""
    return _lookup(TRAIN_ID_TO_ID, train_ids)


def colorize(train_ids):
    """Train ids (numpy or torch, any shape) -> uint8 RGB of shape [..., 3] in the Cityscapes colours."""
    return _lookup(_COLOURS, train_ids)


def _lookup(table: np.ndarray, values):
    if isinstance(values, torch.Tensor):
        return torch.tensor(table, device=values.device)[values.long()]
    return table[np.asarray(values)]
