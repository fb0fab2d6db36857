"""The GTA5 and Cityscapes loaders on tiny trees in the real layouts, their errors, and build_dataset."""
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import rtda.datasets.__main__ as summary
from rtda import datasets
from rtda.config import AugmentConfig, ConfigError, from_dict
from rtda.datasets import CityscapesDataset, DatasetError, GTA5Dataset, build_dataset
from rtda.datasets.inspect import class_pixel_counts
from rtda.datasets.labels import ID_TO_TRAIN_ID, NUM_CLASSES
from rtda.datasets.transforms import Augment

from conftest import HEIGHT, WIDTH, save_png, write_cityscapes, write_gta5

FULL = [WIDTH, HEIGHT]  # config sizes are [width, height]
HALF = [WIDTH // 2, HEIGHT // 2]


# ------------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_items_map_label_ids(cityscapes_tree):
    root, written = cityscapes_tree
    ds = CityscapesDataset(root, "train", FULL)
    assert len(ds) == 4
    assert ds.names == sorted(ds.names) and ds.names[0] == "aachen_000000_000019"
    for index in range(len(ds)):
        item = ds[index]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, HEIGHT, WIDTH)
        assert item["label"].dtype == torch.uint8 and item["label"].shape == (HEIGHT, WIDTH)
        assert np.array_equal(item["label"].numpy(), ID_TO_TRAIN_ID[written[item["name"]]])
    # The evaluator pairs predictions with this ground truth by the stem.
    assert ds.label_path(0) == root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"


def test_cityscapes_resize_images_only_and_full_labels(cityscapes_tree):
    root, written = cityscapes_tree
    item = CityscapesDataset(root, "val", HALF)[0]
    assert item["image"].shape == (3, HEIGHT // 2, WIDTH // 2) and item["label"].shape == (HEIGHT // 2, WIDTH // 2)
    # The blocks are 8x8, so nearest at half size keeps one pixel of each 2x2: a subset of the mapped values.
    assert np.array_equal(item["label"].numpy(), ID_TO_TRAIN_ID[written[item["name"]]][1::2, 1::2])

    unlabelled = CityscapesDataset(root, "train", HALF, labels=False)[0]
    assert set(unlabelled) == {"image", "name"}

    full = CityscapesDataset(root, "val", HALF, full_labels=True)[0]
    assert full["image"].shape == (3, HEIGHT // 2, WIDTH // 2) and full["label"].shape == (HEIGHT, WIDTH)
    assert np.array_equal(full["label"].numpy(), ID_TO_TRAIN_ID[written[full["name"]]])


def test_cityscapes_pseudo_labels(cityscapes_root, tmp_path):
    ds = CityscapesDataset(cityscapes_root, "train", FULL, labels=False)
    rng = np.random.default_rng(1)
    pseudo = {}
    for path, name in zip(ds.images, ds.names):
        pseudo[name] = rng.choice(np.array([*range(NUM_CLASSES), 255], np.uint8), (HEIGHT, WIDTH))
        save_png(tmp_path / path.parent.name / f"{name}.png", pseudo[name])
    ds = CityscapesDataset(cityscapes_root, "train", FULL, pseudo_labels=tmp_path)
    for index in range(len(ds)):
        item = ds[index]
        assert np.array_equal(item["label"].numpy(), pseudo[item["name"]])  # read as train ids, no mapping

    save_png(tmp_path / "aachen" / "aachen_000000_000019.png", np.full((HEIGHT, WIDTH), 40, np.uint8))
    with pytest.raises(DatasetError, match=r"aachen_000000_000019\.png: values 40 are not train ids"):
        ds[0]
    with pytest.raises(DatasetError, match=r"pseudo-label folder '.*nowhere' not found"):
        CityscapesDataset(cityscapes_root, "train", FULL, pseudo_labels=tmp_path / "nowhere")


def test_cityscapes_missing_root_and_empty_split(tmp_path):
    with pytest.raises(DatasetError) as info:
        CityscapesDataset(tmp_path / "x", "train", FULL)
    message = str(info.value)
    assert "Cityscapes root" in message and "\n" not in message
    assert "x/leftImg8bit/train/<city>/*_leftImg8bit.png" in message
    assert "x/gtFine/train/<city>/*_gtFine_labelIds.png" in message

    (tmp_path / "cs" / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split 'test' in .* has no images"):
        CityscapesDataset(tmp_path / "cs", "test", FULL, labels=False)


def test_cityscapes_image_without_label(tmp_path):
    write_cityscapes(tmp_path, {"train": ["aachen"]})
    label = tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(DatasetError, match=f"has no label: expected {label} \\(1 of 2 images lack labels\\)"):
        CityscapesDataset(tmp_path, "train", FULL)
    assert len(CityscapesDataset(tmp_path, "train", FULL, labels=False)) == 2  # images alone are fine


def test_truncated_png_unknown_id_and_rgb_label(tmp_path):
    written = write_cityscapes(tmp_path, {"val": ["lindau"]}, per_city=3)
    stems = sorted(written)
    image = tmp_path / f"leftImg8bit/val/lindau/{stems[0]}_leftImg8bit.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    label = tmp_path / f"gtFine/val/lindau/{stems[1]}_gtFine_labelIds.png"
    save_png(label, np.full((HEIGHT, WIDTH), 77, np.uint8))
    rgb_label = tmp_path / f"gtFine/val/lindau/{stems[2]}_gtFine_labelIds.png"
    save_png(rgb_label, np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    ds = CityscapesDataset(tmp_path, "val", FULL)
    with pytest.raises(DatasetError, match=f"{image}: unreadable or truncated image"):
        ds[0]
    with pytest.raises(DatasetError, match=f"{label}: values 77 are not Cityscapes label ids"):
        ds[1]
    with pytest.raises(DatasetError, match=f"{rgb_label}: label PNG has mode 'RGB'"):
        ds[2]


# ------------------------------------------------------------------------------------------------ GTA5
def test_gta5_items_read_palette_indices(gta5_tree):
    root, written = gta5_tree
    ds = GTA5Dataset(root, FULL)
    assert ds.names == ["00001", "00002", "00003", "00004"]
    for index in range(len(ds)):
        item = ds[index]
        assert item["image"].shape == (3, HEIGHT, WIDTH) and item["image"].dtype == torch.uint8
        assert np.array_equal(item["label"].numpy(), ID_TO_TRAIN_ID[written[item["name"]]])
    resized = GTA5Dataset(root, HALF)[0]
    assert resized["image"].shape == (3, HEIGHT // 2, WIDTH // 2)
    assert np.array_equal(resized["label"].numpy(), ID_TO_TRAIN_ID[written["00001"]][1::2, 1::2])


def test_gta5_size_mismatch_resizes_label_with_one_counted_warning(tmp_path):
    write_gta5(tmp_path, count=4, label_sizes={1: (HEIGHT + 2, WIDTH + 4), 3: (HEIGHT // 2, WIDTH // 2)})
    with pytest.warns(UserWarning) as record:
        ds = GTA5Dataset(tmp_path, FULL)
    assert len(record) == 1
    assert "2 of 4 label maps differ in size" in str(record[0].message) and "00002.png, 00004.png" in str(
        record[0].message)
    for index in (1, 3):
        item = ds[index]
        assert item["label"].shape == item["image"].shape[1:] == (HEIGHT, WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second loader on the same root in this process stays quiet
        GTA5Dataset(tmp_path, HALF)


def test_gta5_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"GTA5 root '.*nowhere' not found: expected .*nowhere/images/NNNNN\.png "
                                           r"and .*nowhere/labels/NNNNN\.png"):
        GTA5Dataset(tmp_path / "nowhere", FULL)
    write_gta5(tmp_path, count=2)
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.raises(DatasetError, match=r"00002\.png has no label: expected .*labels/00002\.png"):
        GTA5Dataset(tmp_path, FULL)
    (tmp_path / "list.txt").write_text("00001.png\n\n00009.png\n")
    with pytest.raises(DatasetError, match=r"list\.txt, line 3: image '00009\.png' not found"):
        GTA5Dataset(tmp_path, FULL, list_file=tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text("00001.png\n")
    assert GTA5Dataset(tmp_path, FULL, list_file=tmp_path / "list.txt").names == ["00001"]
    (tmp_path / "images" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"images/00001\.png: not a PNG file"):
        GTA5Dataset(tmp_path, FULL, list_file=tmp_path / "list.txt")


# ------------------------------------------------------------------------------ augmentation determinism
def test_augmentation_stream_depends_only_on_seed_epoch_index(gta5_root):
    augment = Augment(AugmentConfig(hflip=0.5, scale_crop=0.5, color_jitter=0.5, noise=0.5))
    ds = GTA5Dataset(gta5_root, FULL, augment=augment, seed=3)
    forward = [ds[i] for i in range(len(ds))]
    backward = [ds[i] for i in reversed(range(len(ds)))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(len(ds))]
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(forward, epoch1))
    # Two persistent workers (each with its own copy and its own share of the indices) give the same batches,
    # and see set_epoch from the main process.
    ds.set_epoch(0)
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch, expected in enumerate((forward, epoch1)):
        ds.set_epoch(epoch)
        batches = list(loader)
        assert torch.equal(batches[0]["image"], torch.stack([expected[0]["image"], expected[1]["image"]]))
        assert torch.equal(batches[1]["label"], torch.stack([expected[2]["label"], expected[3]["label"]]))


def test_build_dataset_size_error(cityscapes_root):
    cfg = make_config({}, {}, {"name": "cityscapes", "root": str(cityscapes_root), "split": "val", "size": [64]})
    with pytest.raises(ConfigError, match=r"data.val.size = \[64\]: expected \[width, height\]"):
        build_dataset(cfg.data.val, cfg, "val")


# ------------------------------------------------------------------------------------------ build_dataset
def make_config(source, target, val, **sections):
    return from_dict({"data": {"source": source, "target": target, "val": val, **sections.pop("data", {})},
                      **sections})


def test_build_dataset_roles(gta5_root, cityscapes_root):
    cfg = make_config({"name": "gta5", "root": str(gta5_root), "size": HALF},
                      {"name": "cityscapes", "root": str(cityscapes_root), "split": "train", "size": HALF},
                      {"name": "cityscapes", "root": str(cityscapes_root), "split": "val", "size": HALF},
                      data={"augment": {"hflip": 0.5}}, eval={"label_size": "full"}, seed=7)
    source = build_dataset(cfg.data.source, cfg, "source")
    target = build_dataset(cfg.data.target, cfg, "target")
    val = build_dataset(cfg.data.val, cfg, "val")
    assert isinstance(source, GTA5Dataset) and isinstance(source.augment, Augment) and source.seed == 7
    assert "label" in source[0] and "label" not in target[0] and target.augment is None
    assert val[0]["label"].shape == (HEIGHT, WIDTH) and val[0]["image"].shape == (3, HEIGHT // 2, WIDTH // 2)
    with pytest.raises(ValueError, match="role 'train': expected one of source, target, val"):
        build_dataset(cfg.data.val, cfg, "train")
    with pytest.raises(ConfigError, match="eval.label_size = 'full' needs a Cityscapes-layout val set"):
        build_dataset(cfg.data.source, cfg, "val")


def test_build_dataset_synthetic_reads_the_real_layouts(tmp_path):
    root = str(tmp_path / "synthetic")
    small = {"num_source": 3, "num_target": 2, "num_val": 2, "height": 32, "width": 64}
    cfg = make_config({"name": "synthetic", "root": root, "domain": "source", "size": [64, 32]},
                      {"name": "synthetic", "root": root, "domain": "target", "split": "train", "size": [64, 32]},
                      {"name": "synthetic", "root": root, "domain": "target", "split": "val", "size": [64, 32]},
                      data={"synthetic": small})
    source = build_dataset(cfg.data.source, cfg, "source")
    target = build_dataset(cfg.data.target, cfg, "target")
    val = build_dataset(cfg.data.val, cfg, "val")
    assert isinstance(source, GTA5Dataset) and len(source) == 3
    assert isinstance(target, CityscapesDataset) and len(target) == 2 and "label" not in target[0]
    assert isinstance(val, CityscapesDataset) and len(val) == 2 and val[0]["label"].shape == (32, 64)
    assert set(datasets.DATASETS) == {"gta5", "cityscapes", "synthetic"}


# ------------------------------------------------------------------------------------- python -m rtda.datasets
def test_summary_counts_and_frequencies(gta5_tree, cityscapes_tree, tmp_path, capsys):
    (gta5_root, gta5_written), (cs_root, cs_written) = gta5_tree, cityscapes_tree
    config = tmp_path / "summary.yaml"
    config.write_text(f"data:\n  source: {{name: gta5, root: '{gta5_root}', size: {HALF}}}\n"
                      f"  target: {{name: cityscapes, root: '{cs_root}', split: train, size: {HALF}}}\n"
                      f"  val: {{name: cityscapes, root: '{cs_root}', split: val, size: {HALF}}}\n")
    summary.main(["--config", str(config)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["source", "gta5", "-", "4"]
    assert lines[2].split()[:4] == ["target", "cityscapes", "train", "4"]
    assert lines[3].split()[:4] == ["val", "cityscapes", "val", "2"]
    source_ids = np.concatenate([ID_TO_TRAIN_ID[ids].ravel() for ids in gta5_written.values()])
    val_ids = np.concatenate([ID_TO_TRAIN_ID[ids].ravel() for stem, ids in cs_written.items()
                              if stem.startswith("frankfurt")])
    road = next(line for line in lines if line.startswith("road")).split()
    assert road[1:] == [f"{100 * np.mean(source_ids == 0):.2f}", f"{100 * np.mean(val_ids == 0):.2f}"]

    ds = GTA5Dataset(gta5_root, FULL)
    assert class_pixel_counts(ds, max_images=2).sum() == 2 * HEIGHT * WIDTH
    with pytest.raises(SystemExit, match="error: .*GTA5 root '.*nowhere' not found"):
        summary.main(["--config", str(config), "data.source.root=/nowhere"])
