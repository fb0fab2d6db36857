"""What the GTA5 and Cityscapes loaders share: a list of image (+ label) files turned into items.

An item (docs/architecture.md): `image` uint8 [3, H, W] raw RGB resized to `size`, `label` int64 [H, W]
train ids (absent without labels), `name` the file stem. The subclasses only find the files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.io import DatasetError, read_image, read_label_png
from datasets.labels import check_train_ids, label_ids_to_train_ids
from datasets.transforms import augment_sample, resize_image, resize_label


class ImageLabelDataset(Dataset):
    """Items from parallel lists of image files and label PNGs (`labels=None`: images only).

    `label_format`: `label_ids` (Cityscapes ids, as GTA5 and gtFine store them) or `train_ids` (pseudo-labels).
    `full_labels`: keep labels at their stored size (images are still resized), for full-resolution scoring.
    """

    interpolation = "bilinear"  # image resize mode; build_dataset sets data.*.interpolation

    def __init__(self, images: list[Path], labels: list[Path] | None, names: list[str], size,
                 label_format: Literal["label_ids", "train_ids"] = "label_ids", full_labels: bool = False,
                 augment=None, seed: int = 0):
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise DatasetError(f"size = {size!r}: expected [width, height], two positive ints")
        if full_labels and augment is not None:
            raise DatasetError("full_labels=True with augmentations: geometric augmentations need image and "
                               "label at the same size (full labels are for evaluation only)")
        self.images, self.labels, self.names = images, labels, names
        self.size_hw = (size[1], size[0])  # config sizes are [width, height]
        self.label_format = label_format
        self.full_labels = full_labels
        self.augment = augment
        self.seed = seed
        # In shared memory, so DataLoader workers (persistent ones included) see set_epoch from the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

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

    def read_train_ids(self, index: int) -> np.ndarray:
        """The label of item `index` as uint8 train ids at its stored size (no resize, no augmentation)."""
        path = self.label_path(index)
        values = read_label_png(path)
        if self.label_format == "train_ids":
            return check_train_ids(values, path)
        return label_ids_to_train_ids(values, path)

    def __getitem__(self, index: int) -> dict:
        image = resize_image(read_image(self.images[index]), self.size_hw, self.interpolation)
        label = None
        if self.labels is not None:
            label = torch.from_numpy(self.read_train_ids(index))
            if not self.full_labels:
                label = resize_label(label, self.size_hw)  # also fixes labels stored at another size than the image
        if self.augment is not None:
            image, label = augment_sample(self.augment, image, label, self.seed, self.epoch, index)
        item = {"image": image.contiguous(), "name": self.names[index]}
        if label is not None:
            item["label"] = label.long()
        return item
