"""GTA5 (Playing for Data) in its released layout:

    root/images/NNNNN.png     RGB frames, mostly 1914x1052
    root/labels/NNNNN.png     official: palettised PNGs whose palette indices are Cityscapes label ids;
                              the course subset and other re-saves: RGB colours of the Cityscapes palette,
                              or train ids (datasets/label_forms.py tells them apart from the files)

UDA work trains on all 24,966 frames, or on the names in `list_file` (a deliberate subset). Without a list
file the two folders must hold the same names: an image without a label, or a label without an image (a
half-extracted archive), is an error with the counts. A few label maps differ in size from their image by some
pixels; they are resized (nearest) like every label, and counted in one warning (base.check_label_sizes).
"""
from __future__ import annotations

import os
from pathlib import Path

from rtda.datasets.base import ImageLabelDataset, check_label_sizes, shown
from rtda.datasets.io import DatasetError

FORMS = {
    "label_ids": "GTA5 official: labels/NNNNN.png hold Cityscapes label ids (palettised PNGs)",
    "color": "GTA5 colour labels: labels/NNNNN.png are RGB in the Cityscapes palette (the course subset)",
    "train_ids": "GTA5 re-saved as train ids: labels/NNNNN.png hold train ids 0..18, 255 = ignore",
}


class GTA5Dataset(ImageLabelDataset):
    """GTA5 frames resized (bilinear, antialiased) and labels (nearest) to `size` = [w, h] (protocol 1280x720).

    `label_form`: `auto` (detected from the label files) or a label form of datasets/label_forms.py; `cache`: the
    folder of prepared caches (`data.cache`), None to read the PNGs always."""

    dataset_name = "GTA5"

    def __init__(self, root, size, list_file=None, augment=None, seed: int = 0, labels: bool = True,
                 label_form: str = "auto", cache=None, label_form_key: str = "label_form",
                 interpolation: str = "bilinear"):
        self.root = Path(root)
        image_dir, label_dir = self.root / "images", self.root / "labels"
        if not image_dir.is_dir() or (labels and not label_dir.is_dir()):
            raise DatasetError(f"GTA5 root '{root}' not found: expected {image_dir}/NNNNN.png"
                               + (f" and {label_dir}/NNNNN.png" if labels else ""))
        names = _read_list(list_file, image_dir) if list_file else sorted(
            entry.name for entry in os.scandir(image_dir) if entry.name.endswith(".png"))
        if not names:
            raise DatasetError(f"GTA5 root '{root}' has no images: expected {image_dir}/NNNNN.png")
        images = [image_dir / name for name in names]
        label_files, self.mismatched = None, []
        if labels:
            present = set(os.listdir(label_dir))
            missing = [name for name in names if name not in present]
            if missing:
                raise DatasetError(f"GTA5 image {image_dir / missing[0]} has no label: expected "
                                   f"{label_dir / missing[0]} ({len(missing)} of {len(names)} images lack labels)")
            if not list_file:  # a list file names a subset on purpose: the other labels are not missing images
                _check_no_orphan_labels(present, set(names), image_dir, label_dir)
            label_files = [label_dir / name for name in names]
            self.mismatched = check_label_sizes(images, label_files, f"GTA5 '{root}'", full_labels=False)
        stems = [Path(name).stem for name in names]
        super().__init__(images, label_files, stems, size, label_form=label_form, augment=augment, seed=seed,
                         cache=cache, label_form_key=label_form_key, interpolation=interpolation)

    def describe_root(self) -> str:
        return f"GTA5 '{self.root}'"

    def describe_form(self) -> str:
        if self.labels is None:
            return "GTA5 layout (images/NNNNN.png), images only"
        return FORMS[self.label_form]


def _read_list(list_file, image_dir: Path) -> list[str]:
    path = Path(list_file)
    if not path.is_file():
        raise DatasetError(f"GTA5 list file '{list_file}' not found: expected a text file of image names "
                           "(e.g. 00001.png), one per line")
    names = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if name and not (image_dir / name).is_file():
            raise DatasetError(f"{list_file}, line {line_no}: image '{name}' not found: expected {image_dir / name}")
        if name:
            names.append(name)
    return names


def _check_no_orphan_labels(labels: set[str], images: set[str], image_dir: Path, label_dir: Path) -> None:
    """Labels without an image are an error with the count (a half-extracted archive), as images without labels."""
    orphans = sorted(name for name in labels if name.endswith(".png") and name not in images)
    if orphans:
        raise DatasetError(f"GTA5 {label_dir} has {len(orphans)} labels without an image in {image_dir} "
                           f"({len(images)} images, {len(images) + len(orphans)} labels; missing: {shown(orphans)}): "
                           "expected both folders complete (re-extract the archive), or name a subset on purpose "
                           "in data.<role>.list_file")
