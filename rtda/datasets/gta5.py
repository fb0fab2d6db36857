"""GTA5 (Playing for Data) in its released layout:

    root/images/NNNNN.png     RGB frames, mostly 1914x1052
    root/labels/NNNNN.png     official: palettised PNGs whose palette indices are Cityscapes label ids;
                              the course subset and other re-saves: RGB colours of the Cityscapes palette,
                              or train ids (datasets/label_forms.py tells them apart from the files)

UDA work trains on all 24,966 frames (or the names in `list_file`). A few label maps differ in size from
their image by some pixels; they are resized (nearest) like every label, and counted in one warning.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from rtda.datasets.base import ImageLabelDataset
from rtda.datasets.io import DatasetError, png_header

_warned_roots: set[str] = set()  # one size-mismatch warning per root and process


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
            label_files = [label_dir / name for name in names]
            self.mismatched = [name for name, image, label in zip(names, images, label_files)
                               if png_header(image).size != png_header(label).size]  # headers only
            if self.mismatched and str(self.root) not in _warned_roots:
                _warned_roots.add(str(self.root))
                shown = ", ".join(self.mismatched[:5]) + (", ..." if len(self.mismatched) > 5 else "")
                warnings.warn(f"GTA5 '{root}': {len(self.mismatched)} of {len(names)} label maps differ in size "
                              f"from their image ({shown}); resizing those labels with nearest", stacklevel=2)
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
