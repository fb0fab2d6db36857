"""Cityscapes in the layouts users hold, read directly (no conversion step):

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png       official (or root/images/..., the course zip)
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png        official label ids
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png   cityscapesscripts' createTrainIdLabelImgs,
                                                                               the course zip: train ids
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_color.png           colours (used only when nothing else is there)

When several label files exist for every image, the official `_labelIds.png` is read (and `python -m rtda.datasets`
says so); what the files hold is then told from their values (datasets/label_forms.py), the name only settles a tie.

Images and labels must pair up: an image without a label or a label without an image (a missing val image
would shrink the scored set) is an error with the counts, and so is a label of another size than its image
when labels are scored at their stored size (base.check_label_sizes). A deliberate subset is a folder of its
own in the same layout holding the chosen images and their labels (symlinks will do; docs/data.md).

Item names are the stems `{city}_{seq}_{frame}`: cityscapesscripts' evaluator matches a prediction file
`{stem}*.png` (label ids, anywhere under its prediction folder) to the ground truth `label_path(i)`.
"""
from __future__ import annotations

import os
from pathlib import Path

from rtda.datasets.base import ImageLabelDataset, check_label_sizes, shown
from rtda.datasets.io import DatasetError
from rtda.datasets.label_forms import SHORT

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"  # the official one
IMAGE_DIRS = {"leftImg8bit": "official layout", "images": "course zip layout"}
LABEL_SUFFIXES = {"_gtFine_labelIds.png": "label_ids", "_gtFine_labelTrainIds.png": "train_ids",
                  "_gtFine_color.png": "color"}  # in order of preference: the official one first
NAMED_FORMS = {
    ("leftImg8bit", "_gtFine_labelIds.png", "label_ids"): "Cityscapes official",
    ("leftImg8bit", "_gtFine_labelTrainIds.png", "train_ids"): "Cityscapes after createTrainIdLabelImgs",
    ("images", "_gtFine_labelTrainIds.png", "train_ids"): "Cityscapes course zip",
}


class CityscapesDataset(ImageLabelDataset):
    """One split of Cityscapes; images resized (bilinear, antialiased) and labels (nearest) to `size` = [w, h].

    labels=False: images only (the unlabelled target). full_labels=True: labels at their stored size.
    pseudo_labels=DIR: train-id PNGs `DIR/{city}/{stem}.png` replace gtFine (self-training rounds).
    label_form: `auto` (detected from the files) or a label form of datasets/label_forms.py. cache: `data.cache`.
    """

    dataset_name = "Cityscapes"

    def __init__(self, root, split: str, size, labels: bool = True, augment=None, full_labels: bool = False,
                 pseudo_labels=None, seed: int = 0, label_form: str = "auto", cache=None,
                 label_form_key: str = "label_form", interpolation: str = "bilinear"):
        self.root, self.split = Path(root), split
        label_dir = self.root / "gtFine" / split
        need_gt = labels and pseudo_labels is None
        layout = (f"expected {self.root / 'leftImg8bit' / split}/<city>/*{IMAGE_SUFFIX} (or "
                  f"{self.root / 'images' / split}/<city>/*{IMAGE_SUFFIX}, the course zip)"
                  + (f" and {label_dir}/<city>/*{LABEL_SUFFIX} (or *_gtFine_labelTrainIds.png)" if need_gt else ""))
        found = {name: self.root / name / split for name in IMAGE_DIRS if (self.root / name / split).is_dir()}
        if not found or (need_gt and not label_dir.is_dir()):
            raise DatasetError(f"Cityscapes root '{root}' not found (split '{split}'): {layout}")
        notes = []
        listed = {name: _list_images(folder) for name, folder in found.items()}
        nonempty = [name for name in IMAGE_DIRS if listed.get(name)]
        if not nonempty:
            raise DatasetError(f"Cityscapes split '{split}' in '{root}' has no images: {layout}")
        self.image_dir_name = nonempty[0]
        if len(nonempty) > 1:
            notes.append(f"both leftImg8bit/ and images/ hold {split} images: reading the official leftImg8bit/")
        images = listed[self.image_dir_name]
        names = [p.name[:-len(IMAGE_SUFFIX)] for p in images]

        label_files, form, hint, self.label_suffix = None, label_form, None, None
        if labels and pseudo_labels is not None:
            pseudo_dir = Path(pseudo_labels)
            if not pseudo_dir.is_dir():
                raise DatasetError(f"pseudo-label folder '{pseudo_labels}' not found: expected "
                                   f"{pseudo_dir}/<city>/<stem>.png train-id PNGs for {found[self.image_dir_name]}")
            label_files = [pseudo_dir / p.parent.name / f"{n}.png" for p, n in zip(images, names)]
            form = "train_ids"  # what `adapt.py pseudo-labels` writes
            _check_labels_exist(images, label_files)
        elif labels:
            self.label_suffix, suffix_notes = _choose_suffix(images, names, label_dir, label_form)
            notes += suffix_notes
            label_files = [label_dir / p.parent.name / f"{n}{self.label_suffix}" for p, n in zip(images, names)]
            _check_labels_exist(images, label_files)
            _check_no_orphan_labels(label_dir, self.label_suffix, set(names), found[self.image_dir_name])
            check_label_sizes(images, label_files, f"Cityscapes '{root}' (split '{split}')", full_labels)
            hint = LABEL_SUFFIXES[self.label_suffix]
        self.pseudo_labels = pseudo_labels
        super().__init__(images, label_files, names, size, label_form=form, form_hint=hint,
                         full_labels=full_labels, augment=augment, seed=seed, cache=cache,
                         label_form_key=label_form_key, interpolation=interpolation)
        if pseudo_labels is not None and labels:
            self.label_form_notes = ["pseudo-labels are train ids (what `adapt.py pseudo-labels` writes)"]
        self.label_form_notes += notes

    def describe_root(self) -> str:
        return f"Cityscapes '{self.root}' (split '{self.split}')"

    def describe_form(self) -> str:
        folder = f"{self.image_dir_name}/"
        if self.labels is None:
            return f"Cityscapes {IMAGE_DIRS[self.image_dir_name]} ({folder}), images only"
        if self.pseudo_labels is not None:
            return f"Cityscapes {IMAGE_DIRS[self.image_dir_name]} ({folder}) with pseudo-labels {self.pseudo_labels} (train ids)"
        name = NAMED_FORMS.get((self.image_dir_name, self.label_suffix, self.label_form),
                               f"Cityscapes {IMAGE_DIRS[self.image_dir_name]}")
        return f"{name}: {folder} + gtFine/*{self.label_suffix} holding {SHORT[self.label_form]}"


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for city in folder.iterdir() if city.is_dir() for p in city.glob(f"*{IMAGE_SUFFIX}"))


def _choose_suffix(images: list[Path], names: list[str], label_dir: Path, label_form: str) -> tuple[str, list[str]]:
    """The label-file suffix to read: the first that every image has, the official one first (or the one of an
    explicit `label_form`); when none is complete, the most complete (its missing files are then an error)."""
    listing: dict[str, set[str]] = {}
    for city in {p.parent.name for p in images}:
        folder = label_dir / city
        listing[city] = set(os.listdir(folder)) if folder.is_dir() else set()
    counts = {suffix: sum(f"{n}{suffix}" in listing[p.parent.name] for p, n in zip(images, names))
              for suffix in LABEL_SUFFIXES}
    order = sorted(LABEL_SUFFIXES, key=lambda s: LABEL_SUFFIXES[s] != label_form)  # stable: official order kept
    complete = [s for s in order if counts[s] == len(images)]
    if not complete:
        return max(order, key=lambda s: counts[s]), []
    chosen, notes = complete[0], []
    others = [s for s in complete[1:] if s != "_gtFine_color.png"]
    if others:
        why = "the official one" if chosen == LABEL_SUFFIX else f"as label_form = {label_form} asks"
        notes.append(f"gtFine also has *{', *'.join(others)} for every image: reading *{chosen} ({why})")
    return chosen, notes


def _check_labels_exist(images: list[Path], label_files: list[Path]) -> None:
    missing = [(image, label) for image, label in zip(images, label_files) if not label.is_file()]
    if missing:
        image, label = missing[0]
        raise DatasetError(f"Cityscapes image {image} has no label: expected {label} "
                           f"({len(missing)} of {len(images)} images lack labels)")



def _check_no_orphan_labels(label_dir: Path, suffix: str, names: set[str], image_dir: Path) -> None:
    """Labels (of the suffix read) without an image are an error with the count: a missing val image would
    otherwise shrink the scored set without a word."""
    orphans = sorted(entry.name for city in os.scandir(label_dir) if city.is_dir() for entry in os.scandir(city.path)
                     if entry.name.endswith(suffix) and entry.name[:-len(suffix)] not in names)
    if orphans:
        raise DatasetError(f"Cityscapes {label_dir} has {len(orphans)} labels without an image in {image_dir} "
                           f"({len(names)} images, {len(names) + len(orphans)} labels; missing images of: "
                           f"{shown(orphans)}): expected every image present (re-extract leftImg8bit), or a subset "
                           "on purpose as a folder of its own (docs/data.md, 'A subset on purpose')")
