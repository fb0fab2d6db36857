"""Cityscapes in its official layout, read directly (no `_labelTrainIds.png` conversion step):

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

Item names are the stems `{city}_{seq}_{frame}`: cityscapesscripts' evaluator matches a prediction file
`{stem}*.png` (label ids, anywhere under its prediction folder) to the ground truth `label_path(i)`.
"""
from __future__ import annotations

from pathlib import Path

from datasets.base import ImageLabelDataset
from datasets.io import DatasetError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class CityscapesDataset(ImageLabelDataset):
    """One split of Cityscapes; images resized (bilinear, antialiased) and labels (nearest) to `size` = [w, h].

    labels=False: images only (the unlabelled target). full_labels=True: labels at their stored size.
    pseudo_labels=DIR: train-id PNGs `DIR/{city}/{stem}.png` replace gtFine (self-training rounds).
    """

    def __init__(self, root, split: str, size, labels: bool = True, augment=None, full_labels: bool = False,
                 pseudo_labels=None, seed: int = 0):
        self.root, self.split = Path(root), split
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        layout = (f"expected {image_dir}/<city>/*{IMAGE_SUFFIX}"
                  + (f" and {label_dir}/<city>/*{LABEL_SUFFIX}" if labels and pseudo_labels is None else ""))
        if not image_dir.is_dir() or (labels and pseudo_labels is None and not label_dir.is_dir()):
            raise DatasetError(f"Cityscapes root '{root}' not found (split '{split}'): {layout}")
        images = sorted(p for city in image_dir.iterdir() if city.is_dir() for p in city.glob(f"*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetError(f"Cityscapes split '{split}' in '{root}' has no images: {layout}")
        names = [p.name[:-len(IMAGE_SUFFIX)] for p in images]

        label_files, label_format = None, "label_ids"
        if labels and pseudo_labels is not None:
            pseudo_dir = Path(pseudo_labels)
            if not pseudo_dir.is_dir():
                raise DatasetError(f"pseudo-label folder '{pseudo_labels}' not found: expected "
                                   f"{pseudo_dir}/<city>/<stem>.png train-id PNGs for {image_dir}")
            label_files = [pseudo_dir / p.parent.name / f"{n}.png" for p, n in zip(images, names)]
            label_format = "train_ids"
        elif labels:
            label_files = [label_dir / p.parent.name / f"{n}{LABEL_SUFFIX}" for p, n in zip(images, names)]
        if label_files is not None:
            _check_labels_exist(images, label_files)
        super().__init__(images, label_files, names, size, label_format=label_format, full_labels=full_labels,
                         augment=augment, seed=seed)


def _check_labels_exist(images: list[Path], label_files: list[Path]) -> None:
    missing = [(image, label) for image, label in zip(images, label_files) if not label.is_file()]
    if missing:
        image, label = missing[0]
        raise DatasetError(f"Cityscapes image {image} has no label: expected {label} "
                           f"({len(missing)} of {len(images)} images lack labels)")
