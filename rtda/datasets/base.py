"""What the GTA5 and Cityscapes loaders share: a list of image (+ label) files turned into items.

An item (docs/architecture.md): `image` uint8 [3, H, W] raw RGB resized to `size`, `label` uint8 [H, W]
train ids (absent without labels), `name` the file stem. The subclasses only find the files and the layout.

Per item: the resized image and label come from the prepared cache (`datasets/cache.py`) when a complete one
matches these files, size and label form, else from the files; augmentations run after either, so both give
the same bytes. The label form (`datasets/label_forms.py`) is detected from a sample of the files unless given.
"""
from __future__ import annotations

import copy
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from rtda.datasets.io import COLOUR_TYPE_NAMES, DatasetError, png_header, read_image
from rtda.datasets.label_forms import DESCRIPTIONS, LABEL_FORMS, PNG_COLOUR_TYPES, decode_train_ids, detect_label_form
from rtda.datasets.transforms import augment_sample, resize_image, resize_label

SHOWN_NAMES = 5  # file names an error or warning about many files lists before "..."
MAX_ASPECT_CHANGE = 0.10  # pre-flight: a label whose aspect ratio differs more from its image's is mispaired
OFF_PALETTE_SLOTS = 65  # the main process and up to 64 DataLoader workers
CHECK_THREADS = 16  # header reads are I/O: threads overlap them (network file systems gain the most)


class ImageLabelDataset(Dataset):
    """Items from parallel lists of image files and label PNGs (`labels=None`: images only).

    `label_form`: `auto` (detected from the files), `label_ids`, `train_ids` or `color` (datasets/label_forms.py);
    `form_hint` the label form the file names suggest, for values that fit two alike.
    `full_labels`: keep labels at their stored size (images are still resized), for full-resolution scoring.
    `cache`: the folder of prepared caches (`data.cache`), or None to always read the files.
    """

    dataset_name = "images"

    def __init__(self, images: list[Path], labels: list[Path] | None, names: list[str], size,
                 label_form: str = "auto", form_hint: str | None = None, full_labels: bool = False,
                 augment=None, seed: int = 0, cache=None, label_form_key: str = "label_form",
                 interpolation: str = "bilinear"):
        self.interpolation = interpolation  # image resize (`data.*.interpolation`); part of the cache key
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise DatasetError(f"size = {size!r}: expected [width, height], two positive ints")
        if full_labels and augment is not None:
            raise DatasetError("full_labels=True with augmentations: geometric augmentations need image and "
                               "label at the same size (full labels are for evaluation only)")
        self.images, self.labels, self.names = images, labels, names
        self.size_hw = (size[1], size[0])  # config sizes are [width, height]
        self.full_labels = full_labels
        self.augment = augment
        self.seed = seed
        self.label_form_key = label_form_key
        self.label_form_notes: list[str] = []
        self.label_form = None
        if labels is not None:
            if label_form == "auto":
                detection = detect_label_form(labels, what=self.describe_root(), key=label_form_key, hint=form_hint)
                self.label_form = detection.label_form
                self.label_form_notes += detection.notes
                self.label_form_notes.insert(0, f"detected from {detection.sampled} of {len(labels)} label files")
            elif label_form in LABEL_FORMS:
                self.label_form = label_form
                self.label_form_notes.append(f"set by {label_form_key}")
            else:
                raise DatasetError(f"{label_form_key} = {label_form!r}: expected auto or one of {', '.join(LABEL_FORMS)}")
        # In shared memory, so DataLoader workers (persistent ones included) see set_epoch from the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # Off-palette colour pixels and files: one row per DataLoader worker (row 0: the main process), so no two
        # processes add to one number; plus the flag that makes the report happen once per run. Shared memory.
        self._off_palette = torch.zeros(OFF_PALETTE_SLOTS, 2, dtype=torch.int64).share_memory_()
        self._off_palette_reported = torch.zeros((), dtype=torch.int64).share_memory_()
        self.cache_dir = None
        self._image_entry = self._label_entry = None  # complete cache entries in use
        if cache is not None:
            self.attach_cache(cache)

    # ---------------------------------------------------------------------------------------- description
    def describe_root(self) -> str:
        return f"{self.dataset_name} set"

    def describe_form(self) -> str:
        """One line: the layout and label form read (subclasses name their layouts)."""
        if self.labels is None:
            return "images only"
        return DESCRIPTIONS[self.label_form]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch`; call before `iter(loader)` starts the epoch."""
        self._epoch.fill_(epoch)

    def label_path(self, index: int) -> Path:
        if self.labels is None:
            raise DatasetError("this data set was built without labels (labels=False)")
        return self.labels[index]

    # --------------------------------------------------------------------------------------------- reading
    def decode_label(self, index: int) -> tuple[np.ndarray, int]:
        """(uint8 train ids [H, W] at the stored size, off-palette pixels read as 255) of item `index`'s label,
        with no off-palette report (the caller counts them)."""
        return decode_train_ids(self.label_path(index), self.label_form)

    def read_train_ids(self, index: int) -> np.ndarray:
        """The label of item `index` as uint8 train ids at its stored size (no resize, no augmentation)."""
        train_ids, off = self.decode_label(index)
        if off:
            self._report_off_palette(self.label_path(index), off)
        return train_ids

    @property
    def off_palette(self) -> tuple[int, int]:
        """(pixels, files) read so far with colours outside the Cityscapes palette, over every worker."""
        pixels, files = self._off_palette.sum(0).tolist()
        return pixels, files

    def _report_off_palette(self, path: Path, count: int) -> None:
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (OFF_PALETTE_SLOTS - 1)
        self._off_palette[slot, 0] += count
        self._off_palette[slot, 1] += 1
        if self._first_off_palette_report():
            warnings.warn(f"{path}: {count} label pixels have colours outside the Cityscapes palette; they are read "
                          "as ignore (255). Reported once per run; `python -m rtda.datasets --config FILE --check` counts "
                          "them in every file", stacklevel=3)

    def _first_off_palette_report(self) -> bool:
        """True the first time any process of this run asks (a shared flag), so off-palette pixels warn once."""
        if int(self._off_palette_reported):
            return False
        self._off_palette_reported.fill_(1)
        return True

    def load_uncached(self, index: int, image: bool = True, label: bool = True):
        """(image uint8 [3, H, W] at `size`, label uint8 [H, W] train ids, off-palette pixels) from the files;
        a part not asked for (or a label of a set without labels) is None."""
        image = resize_image(read_image(self.images[index]), self.size_hw, self.interpolation) if image else None
        want_label, label, off = label, None, 0
        if self.labels is not None and want_label:
            train_ids, off = self.decode_label(index)
            label = torch.from_numpy(train_ids)
            if not self.full_labels:
                label = resize_label(label, self.size_hw)  # also fixes labels stored at another size than the image
        return image, label, off

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image and label of item `index` before augmentation: from the cache where prepared (and the item's
        checksum holds), else the files."""
        image = label = None
        if self._image_entry is not None:
            cached = self._image_entry.read(index)  # None: its bytes fail their checksum (warned), read the file
            # HWC in the cache; the channels-last view is the layout the uncached path hands to the augmentations
            image = None if cached is None else torch.from_numpy(cached).permute(2, 0, 1)
        if self.labels is not None and self._label_entry is not None:
            cached = self._label_entry.read(index)
            label = None if cached is None else torch.from_numpy(cached)
        need_label = self.labels is not None and label is None
        if image is None or need_label:
            fresh_image, fresh_label, off = self.load_uncached(index, image=image is None, label=need_label)
            if off:
                self._report_off_palette(self.label_path(index), off)
            image = fresh_image if image is None else image
            label = fresh_label if need_label else label
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        if self.augment is not None:
            image, label = augment_sample(self.augment, image, label, self.seed, self.epoch, index)
        item = {"image": image.contiguous(), "name": self.names[index]}
        if label is not None:
            item["label"] = label  # uint8 train ids: 8x less to move between processes; int64 on the device
        return item

    # ----------------------------------------------------------------------------------------------- cache
    def label_shape(self) -> tuple[int, int] | None:
        """(H, W) every label has once loaded: `size`, or the stored size for full labels if all share one."""
        if self.labels is None:
            return None
        if not self.full_labels:
            return self.size_hw
        sizes = {(header.height, header.width) for header in map(png_header, self.labels)}
        if len(sizes) != 1:
            return None  # full-size labels of several sizes: not cached, read from the files
        return sizes.pop()

    def cache_entries(self, cache_dir=None) -> list:
        """The cache entries this set reads: its images at `size`, and its labels (when it has cacheable ones)."""
        from rtda.datasets.cache import image_entry, label_entry  # on use: only sets with a cache need it

        cache_dir = cache_dir if cache_dir is not None else self.cache_dir
        if cache_dir is None:
            return []
        entries = [image_entry(cache_dir, self.images, self.size_hw, self.interpolation)]
        shape = self.label_shape()
        if shape is not None:
            entries.append(label_entry(cache_dir, self.labels, shape, self.label_form, self.full_labels))
        return entries

    def attach_cache(self, cache_dir) -> None:
        """Read from the complete entries of `cache_dir` that match these files, size and label form (if any)."""
        self.cache_dir = Path(cache_dir)
        self._image_entry = self._label_entry = None
        for entry in self.cache_entries():
            if not entry.ready():
                entry.report_unused()
                continue
            if entry.kind == "images":
                self._image_entry = entry
            else:
                self._label_entry = entry
                pixels, files = entry.manifest.get("off_palette_pixels", 0), entry.manifest.get("off_palette_files", 0)
                if pixels and self._first_off_palette_report():
                    warnings.warn(f"{self.describe_root()}: {pixels} label pixels in {files} files have colours outside "
                                  "the Cityscapes palette; they are read as ignore (255) (counted by `python -m rtda.datasets "
                                  "prepare`)", stacklevel=3)

    @property
    def cached(self) -> dict[str, bool]:
        """Which parts of the items come from the cache."""
        return {"images": self._image_entry is not None, "labels": self._label_entry is not None}

    def subset(self, count: int):
        """The first `count` items as a data set of their own (benchmarks); no cache attached."""
        part = copy.copy(self)
        part.images, part.names = self.images[:count], self.names[:count]
        part.labels = None if self.labels is None else self.labels[:count]
        part.cache_dir, part._image_entry, part._label_entry = None, None, None
        part._off_palette = torch.zeros(OFF_PALETTE_SLOTS, 2, dtype=torch.int64).share_memory_()
        part._off_palette_reported = torch.zeros((), dtype=torch.int64).share_memory_()
        return part

    # ---------------------------------------------------------------------------------------- pre-flight
    def check_files(self) -> int:
        """Fast pre-flight check before training: every file present, a complete PNG (header and end chunk),
        labels in the PNG colour type and bit depth of the set's label form, label sizes that fit their image.

        Headers only (45 bytes a file, read by a thread pool). Raises one
        DatasetError naming the first bad file and what was expected (and how many fail); returns the number of
        files checked. Values inside the files are the full scan's job: `python -m rtda.datasets --config FILE --check`.
        """
        problems = self.file_problems()
        total = len(self.images) + (len(self.labels) if self.labels is not None else 0)
        if problems:
            more = f" ({len(problems)} of {total} files fail the pre-flight check)" if len(problems) > 1 else ""
            raise DatasetError(problems[0] + more)
        return total

    def file_problems(self) -> list[str]:
        """One line per file that fails the pre-flight check (see `check_files`), in file order."""
        images = list(self.images)
        labels = list(self.labels) if self.labels is not None else []
        workers = min(CHECK_THREADS, (os.cpu_count() or 1) * 4)
        with ThreadPoolExecutor(workers) as pool:
            image_headers = list(pool.map(_header_or_error, images, chunksize=256))
            label_headers = list(pool.map(_header_or_error, labels, chunksize=256))
        problems = []
        for path, header in zip(images, image_headers):
            if isinstance(header, str):
                problems.append(header)
            elif not header.complete:
                problems.append(_truncated(path))
        allowed = PNG_COLOUR_TYPES.get(self.label_form, ())
        wanted = "/".join(f"8-bit {COLOUR_TYPE_NAMES[t]}" for t in allowed)
        for image, path, image_header, header in zip(images, labels, image_headers, label_headers):
            if isinstance(header, str):
                problems.append(header)
            elif not header.complete:
                problems.append(_truncated(path))
            elif header.bit_depth != 8 or header.colour_type not in allowed:
                problems.append(f"{path}: label PNG is {header.kind}, expected {wanted} for the {self.label_form} "
                                f"labels of {self.describe_root()} ({self.describe_form()})")
            elif not isinstance(image_header, str):
                label_aspect = header.width / header.height
                image_aspect = image_header.width / image_header.height
                if abs(label_aspect / image_aspect - 1) > MAX_ASPECT_CHANGE:
                    problems.append(f"{path}: label is {header.width}x{header.height}, its image {image} is "
                                    f"{image_header.width}x{image_header.height}: expected the same size (or the "
                                    "same aspect ratio, resized); is the label paired with the right image?")
        return problems



_size_warned: set[str] = set()  # one label-size warning per set and process


def shown(names: list[str]) -> str:
    """The first SHOWN_NAMES of `names`, comma-separated, with ', ...' when there are more."""
    return ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")


def check_label_sizes(images: list[Path], labels: list[Path], what: str, full_labels: bool) -> list[str]:
    """The one rule for labels stored at another size than their image (headers only); returns their names.

    Scored at their stored size (`full_labels`, eval.label_size: full) such a label cannot be matched to its
    prediction pixel for pixel: a DatasetError with the count and the first names. Resized to `size` (training,
    eval.label_size: protocol) image and label meet at one size: the labels are resized (nearest) and counted in
    one warning per set and process, as a few real GTA5 frames need."""
    mismatched = [label.name for image, label in zip(images, labels) if png_header(image).size != png_header(label).size]
    if not mismatched:
        return mismatched
    count = f"{len(mismatched)} of {len(labels)} label maps differ in size from their image ({shown(mismatched)})"
    if full_labels:
        raise DatasetError(f"{what}: {count}: expected each label at its image's size, as they are scored at their "
                           "stored size (eval.label_size: full); re-extract the labels, or score at the training size "
                           "with eval.label_size=protocol")
    if what not in _size_warned:
        _size_warned.add(what)
        warnings.warn(f"{what}: {count}; resizing those labels with nearest", stacklevel=3)
    return mismatched


def _header_or_error(path: Path):
    """The PngHeader of `path`, or the one-line error message (a missing file, not a PNG)."""
    try:
        return png_header(path)
    except DatasetError as exc:
        return str(exc).replace(": cannot read (No such file or directory)", ": missing (expected a PNG file here)")


def _truncated(path: Path) -> str:
    return f"{path}: truncated PNG (no end chunk IEND): expected a complete PNG file (re-copy or re-extract it)"
