"""Shared fixtures: tiny data trees in the real GTA5 and Cityscapes layouts (64x128 images, label-id PNGs).

    def test_x(cityscapes_root, gta5_root): ...               # read-only session trees
    write_cityscapes(tmp_path / "cs", {"train": ["aachen", "bonn"]})  # your own tree to modify

Labels hold Cityscapes label ids drawn from every id 0..33 (so ignore ids appear too); GTA5 labels are
palettised like the real ones, gtFine labelIds are greyscale.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, however pytest is started

HEIGHT, WIDTH = 64, 128
IDS_PER_SPLIT = 2  # images per city


def random_pair(rng: np.random.Generator, height: int = HEIGHT, width: int = WIDTH):
    """An RGB image and a label-id map with blocky regions of every id 0..33."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    blocks = rng.integers(0, 34, (height // 8 + 1, width // 8 + 1), dtype=np.uint8)
    label_ids = np.kron(blocks, np.ones((8, 8), np.uint8))[:height, :width]
    return image, label_ids


def save_palettised(path: Path, label_ids: np.ndarray) -> None:
    """A mode-P PNG whose indices are the label ids (as GTA5 ships them); the palette is arbitrary colours."""
    img = Image.fromarray(label_ids)  # mode L; putpalette turns it into P, keeping the indices
    img.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_cityscapes(root: Path, cities: dict[str, list[str]], per_city: int = IDS_PER_SPLIT, seed: int = 0,
                     height: int = HEIGHT, width: int = WIDTH) -> dict[str, np.ndarray]:
    """Write root/leftImg8bit/{split}/{city}/... and gtFine labelIds; returns {stem: label ids}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, names in cities.items():
        for city in names:
            for frame in range(per_city):
                stem = f"{city}_{frame:06d}_000019"
                image, label_ids = random_pair(rng, height, width)
                save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
                save_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
                written[stem] = label_ids
    return written


def write_gta5(root: Path, count: int = 4, seed: int = 0, height: int = HEIGHT, width: int = WIDTH,
               label_sizes: dict[int, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Write root/images/NNNNN.png + palettised root/labels/NNNNN.png; `label_sizes` {index: (h, w)} makes
    those label maps differ in size from their image, as a few real GTA5 frames do. Returns {stem: label ids}."""
    rng = np.random.default_rng(seed)
    written = {}
    for index in range(count):
        stem = f"{index + 1:05d}"
        image, _ = random_pair(rng, height, width)
        _, label_ids = random_pair(rng, *(label_sizes or {}).get(index, (height, width)))
        save_png(root / "images" / f"{stem}.png", image)
        save_palettised(root / "labels" / f"{stem}.png", label_ids)
        written[stem] = label_ids
    return written


@pytest.fixture(scope="session")
def cityscapes_tree(tmp_path_factory):
    """(root, {stem: label ids}) of a read-only Cityscapes tree: train 2 cities x 2, val 1 city x 2."""
    root = tmp_path_factory.mktemp("Cityscapes")
    written = write_cityscapes(root, {"train": ["aachen", "bremen"], "val": ["frankfurt"]})
    return root, written


@pytest.fixture(scope="session")
def cityscapes_root(cityscapes_tree) -> Path:
    return cityscapes_tree[0]


@pytest.fixture(scope="session")
def gta5_tree(tmp_path_factory):
    """(root, {stem: label ids}) of a read-only GTA5 tree of 4 frames, all label sizes matching."""
    root = tmp_path_factory.mktemp("GTA5")
    return root, write_gta5(root, count=4)


@pytest.fixture(scope="session")
def gta5_root(gta5_tree) -> Path:
    return gta5_tree[0]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the suite (and OMP_NUM_THREADS=1 for its subprocesses): tiny tensors gain
    nothing from more, two threads per process oversubscribe a busy 2-core machine badly, and an in-process
    run and a subprocess run must use the same kernels to compare bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_overrides(root: Path, **extra) -> list[str]:
    """A few iterations on 64x128 synthetic images, in float32 on the CPU, deterministic."""
    settings = {
        "data.source.root": root, "data.target.root": root, "data.val.root": root,
        "data.source.size": "[128,64]", "data.target.size": "[128,64]", "data.val.size": "[128,64]",
        "data.synthetic.num_source": 12, "data.synthetic.num_target": 8, "data.synthetic.num_val": 4,
        "data.synthetic.height": 64, "data.synthetic.width": 128,
        "train.iters": 4, "train.batch_size": 2, "train.workers": 0, "train.log_interval": 2,
        "train.checkpoint_interval": 2, "train.deterministic": "true", "train.vis_images": 2,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


# ------------------------------------------------------------------------------ the label forms users hold
# (issue 9; README "Data"): the same scenes written the way each form stores them.
CITYSCAPES_FORMS = ("cityscapes_official", "cityscapes_trainids", "cityscapes_course")
GTA5_FORMS = ("gta5_official", "gta5_color", "gta5_trainids")


def label_id_colours(label_ids: np.ndarray) -> np.ndarray:
    """The cityscapesscripts colour of every label id: how the colour re-saves of GTA5 are made."""
    from cityscapesscripts.helpers.labels import id2label

    table = np.zeros((256, 3), np.uint8)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256:
            table[label_id] = label.color
    return table[label_ids]


def expected_train_ids(label_ids: np.ndarray, form: str) -> np.ndarray:
    """What the loader must return for `label_ids` written in `form`. A colour label cannot tell 'polegroup'
    (id 18) from 'pole' (they share a colour): it reads as pole (train id 5); the id forms ignore it."""
    from rtda.datasets.labels import ID_TO_TRAIN_ID

    train_ids = ID_TO_TRAIN_ID[label_ids].copy()
    if form.endswith("color"):
        train_ids[label_ids == 18] = 5
    return train_ids


def write_cityscapes_form(root: Path, form: str, cities: dict[str, list[str]] | None = None,
                          per_city: int = IDS_PER_SPLIT, seed: int = 0, height: int = HEIGHT,
                          width: int = WIDTH, both_label_files: bool = True) -> dict[str, np.ndarray]:
    """A Cityscapes tree in `form` (CITYSCAPES_FORMS); returns {stem: label ids}.

    cityscapes_official: leftImg8bit/ + *_gtFine_labelIds.png. cityscapes_trainids: what createTrainIdLabelImgs
    leaves, *_gtFine_labelTrainIds.png next to the labelIds (only the train ids with both_label_files=False).
    cityscapes_course: images/ + *_gtFine_labelTrainIds.png only."""
    from rtda.datasets.labels import ID_TO_TRAIN_ID

    assert form in CITYSCAPES_FORMS, form
    cities = cities or {"train": ["aachen", "bremen"], "val": ["frankfurt"]}
    image_dir = "images" if form == "cityscapes_course" else "leftImg8bit"
    rng = np.random.default_rng(seed)
    written = {}
    for split, names in cities.items():
        for city in names:
            for frame in range(per_city):
                stem = f"{city}_{frame:06d}_000019"
                image, label_ids = random_pair(rng, height, width)
                save_png(root / image_dir / split / city / f"{stem}_leftImg8bit.png", image)
                gt = root / "gtFine" / split / city
                if form == "cityscapes_official" or (form == "cityscapes_trainids" and both_label_files):
                    save_png(gt / f"{stem}_gtFine_labelIds.png", label_ids)
                if form != "cityscapes_official":
                    save_png(gt / f"{stem}_gtFine_labelTrainIds.png", ID_TO_TRAIN_ID[label_ids])
                written[stem] = label_ids
    return written


def write_gta5_form(root: Path, form: str, count: int = 4, seed: int = 0, height: int = HEIGHT,
                    width: int = WIDTH) -> dict[str, np.ndarray]:
    """A GTA5 tree in `form` (GTA5_FORMS); returns {stem: label ids}.

    gta5_official: palettised label ids with the label colours as palette (as released). gta5_color: RGB colour
    labels (the course subset). gta5_trainids: greyscale train ids (a re-saved set)."""
    from rtda.datasets.labels import ID_TO_TRAIN_ID

    assert form in GTA5_FORMS, form
    rng = np.random.default_rng(seed)
    written = {}
    for index in range(count):
        stem = f"{index + 1:05d}"
        image, _ = random_pair(rng, height, width)
        _, label_ids = random_pair(rng, height, width)
        save_png(root / "images" / f"{stem}.png", image)
        label_path = root / "labels" / f"{stem}.png"
        if form == "gta5_official":
            img = Image.fromarray(label_ids)
            img.putpalette(label_id_colours(np.arange(256, dtype=np.uint8)).ravel().tolist())
            label_path.parent.mkdir(parents=True, exist_ok=True)
            img.save(label_path)
        elif form == "gta5_color":
            save_png(label_path, label_id_colours(label_ids))
        else:
            save_png(label_path, ID_TO_TRAIN_ID[label_ids])
        written[stem] = label_ids
    return written


def straight_and_resumed(cfg, tmp_path: Path, monkeypatch) -> tuple[dict, dict]:
    """last.pt of `cfg` trained straight through, and of the same run resumed from its iteration-2 last.pt."""
    import rtda.engine.checkpoint
    from rtda.engine import train
    from rtda.utils.files import load_checkpoint, save_checkpoint

    save = save_checkpoint
    halfway = tmp_path / "halfway" / "last.pt"

    def save_and_keep_halfway(state, path):
        save(state, path)
        if state["iteration"] == 2 and Path(path).name == "last.pt":
            save(state, halfway)

    monkeypatch.setattr(rtda.engine.checkpoint, "save_checkpoint", save_and_keep_halfway)
    straight = load_checkpoint(train(cfg, work_dir=tmp_path / "straight") / "last.pt")
    assert halfway.is_file()
    resumed = load_checkpoint(train(cfg, work_dir=tmp_path / "resumed", resume=str(halfway)) / "last.pt")
    return straight, resumed


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The tiny synthetic domains (tiny_overrides' sizes), generated once per session by the real data path."""
    from rtda.config import load_config
    from rtda.datasets import build_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    source_only = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "gta5_bisenet.yaml"
    cfg = load_config(source_only, tiny_overrides(root))
    build_dataset(cfg.data.source, cfg, "source")
    return root
