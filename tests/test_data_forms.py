"""The data forms users hold (issue 9): detected from the files, read with no conversion, trained and evaluated
through the real CLIs; colour labels with off-palette pixels; ambiguous and undetectable label files."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import rtda.datasets.__main__ as summary
from rtda.config import ConfigError, load_config
from rtda.datasets import CityscapesDataset, DatasetError, GTA5Dataset, build_dataset
from rtda.datasets.labels import COLOUR_TO_TRAIN_ID, ID_TO_TRAIN_ID, colours_to_train_ids

from conftest import (
    CITYSCAPES_FORMS,
    GTA5_FORMS,
    HEIGHT,
    WIDTH,
    expected_train_ids,
    label_id_colours,
    save_png,
    tiny_overrides,
    write_cityscapes_form,
    write_gta5_form,
)

REPO = Path(__file__).resolve().parents[1]
FULL = [WIDTH, HEIGHT]
ENCODING = {"cityscapes_official": "label_ids", "cityscapes_trainids": "label_ids", "cityscapes_course": "train_ids",
            "gta5_official": "label_ids", "gta5_color": "color", "gta5_trainids": "train_ids"}


def build(root: Path, form: str, split: str = "train", **kwargs):
    if form in GTA5_FORMS:
        return GTA5Dataset(root, FULL, **kwargs)
    return CityscapesDataset(root, split, FULL, **kwargs)


def write(root: Path, form: str, **kwargs):
    return (write_gta5_form if form in GTA5_FORMS else write_cityscapes_form)(root, form, **kwargs)


@pytest.mark.parametrize("form", CITYSCAPES_FORMS + GTA5_FORMS)
def test_every_form_is_detected_and_read_as_train_ids(tmp_path, form):
    written = write(tmp_path, form)
    ds = build(tmp_path, form)
    assert ds.label_form == ENCODING[form]
    for index in range(len(ds)):
        item = ds[index]
        assert item["label"].dtype == torch.uint8 and item["image"].shape == (3, HEIGHT, WIDTH)
        assert np.array_equal(item["label"].numpy(), expected_train_ids(written[item["name"]], form))
    assert ds.check_files() == 2 * len(ds)


def test_form_descriptions_and_the_official_pick(tmp_path):
    both = write_cityscapes_form(tmp_path / "both", "cityscapes_trainids")
    ds = CityscapesDataset(tmp_path / "both", "train", FULL)
    assert ds.label_suffix == "_gtFine_labelIds.png" and ds.describe_form().startswith("Cityscapes official")
    assert any("also has *_gtFine_labelTrainIds.png" in note and "the official one" in note for note in ds.label_form_notes)
    # asking for train ids reads the labelTrainIds files, with the same result
    forced = CityscapesDataset(tmp_path / "both", "train", FULL, label_form="train_ids")
    assert forced.label_suffix == "_gtFine_labelTrainIds.png"
    assert torch.equal(forced[1]["label"], ds[1]["label"])
    assert np.array_equal(ds[0]["label"].numpy(), ID_TO_TRAIN_ID[both[ds.names[0]]])

    write_cityscapes_form(tmp_path / "trainids", "cityscapes_trainids", both_label_files=False)
    only = CityscapesDataset(tmp_path / "trainids", "val", FULL)
    assert only.label_form == "train_ids"
    assert only.describe_form().startswith("Cityscapes after createTrainIdLabelImgs")
    write_cityscapes_form(tmp_path / "course", "cityscapes_course")
    assert CityscapesDataset(tmp_path / "course", "val", FULL).describe_form().startswith("Cityscapes course zip")
    assert CityscapesDataset(tmp_path / "course", "train", FULL, labels=False).describe_form().endswith("images only")


def test_values_decide_not_names(tmp_path):
    """labelIds files holding train ids (255 present) are read as train ids, and the mismatch is said."""
    written = write_cityscapes_form(tmp_path, "cityscapes_official", cities={"val": ["lindau"]})
    for stem, ids in written.items():
        save_png(tmp_path / f"gtFine/val/lindau/{stem}_gtFine_labelIds.png", ID_TO_TRAIN_ID[ids])
    ds = CityscapesDataset(tmp_path, "val", FULL)
    assert ds.label_form == "train_ids"
    assert any("names suggest label_ids, but the values are train_ids" in note for note in ds.label_form_notes)
    assert np.array_equal(ds[0]["label"].numpy(), ID_TO_TRAIN_ID[written[ds.names[0]]])


def test_a_retrained_gta5_set_is_not_read_as_label_ids(tmp_path):
    """The 92.65%-ignore bug: a GTA5 set re-saved as train ids (mode P, palette of arbitrary colours)."""
    written = write_gta5_form(tmp_path, "gta5_trainids")
    for stem, ids in written.items():  # palettised like the official files, values are train ids
        img = Image.fromarray(ID_TO_TRAIN_ID[ids])
        img.putpalette(np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8).tolist())
        img.save(tmp_path / "labels" / f"{stem}.png")
    ds = GTA5Dataset(tmp_path, FULL)
    assert ds.label_form == "train_ids"
    ignored = np.mean(ds[0]["label"].numpy() == 255)
    assert ignored == pytest.approx(np.mean(ID_TO_TRAIN_ID[written["00001"]] == 255))


def test_values_fitting_two_forms_are_an_error_listing_both(tmp_path):
    write_gta5_form(tmp_path, "gta5_trainids", count=2)
    for stem in ("00001", "00002"):  # every value 0..18 and no 255: label ids or train ids alike
        save_png(tmp_path / "labels" / f"{stem}.png", np.tile(np.arange(19, dtype=np.uint8), (HEIGHT, WIDTH // 19 + 1))[:, :WIDTH])
    with pytest.raises(DatasetError) as info:
        GTA5Dataset(tmp_path, FULL, label_form_key="data.source.label_form")
    message = str(info.value)
    assert "fit label_ids and train_ids alike" in message and "set data.source.label_form to one of" in message
    assert "00001.png" in message and "\n" not in message
    assert GTA5Dataset(tmp_path, FULL, label_form="train_ids").label_form == "train_ids"  # the override
    # palettised with the official label-id palette: the palette settles it
    for stem in ("00001", "00002"):
        img = Image.open(tmp_path / "labels" / f"{stem}.png")
        img.putpalette(label_id_colours(np.arange(256, dtype=np.uint8)).ravel().tolist())
        img.save(tmp_path / "labels" / f"{stem}.png")
    ds = GTA5Dataset(tmp_path, FULL)
    assert ds.label_form == "label_ids" and any("from the PNG palette" in n for n in ds.label_form_notes)


def test_undetectable_labels_list_the_forms_looked_for(tmp_path):
    write_gta5_form(tmp_path, "gta5_official", count=2)
    for stem in ("00001", "00002"):
        save_png(tmp_path / "labels" / f"{stem}.png", np.full((HEIGHT, WIDTH), 40, np.uint8))
    with pytest.raises(DatasetError) as info:
        GTA5Dataset(tmp_path, FULL)
    message = str(info.value)
    assert "labels/00001.png: mode L, values 40" in message and "fit none of the label forms" in message
    assert "label_ids:" in message and "train_ids:" in message and "color:" in message and "\n" not in message
    rgb = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)  # a photo, not a colour label
    for stem in ("00001", "00002"):
        save_png(tmp_path / "labels" / f"{stem}.png", rgb)
    with pytest.raises(DatasetError, match=r"mode RGB, 0\.0% of pixels in Cityscapes colours: .* fit none"):
        GTA5Dataset(tmp_path, FULL)


def test_colour_palette_maps_train_colours_and_ignores_the_rest():
    assert COLOUR_TO_TRAIN_ID[(128, 64, 128)] == 0 and COLOUR_TO_TRAIN_ID[(119, 11, 32)] == 18  # road, bicycle
    assert COLOUR_TO_TRAIN_ID[(153, 153, 153)] == 5 and COLOUR_TO_TRAIN_ID[(0, 0, 142)] == 13  # shared colours
    assert COLOUR_TO_TRAIN_ID[(250, 170, 160)] == 255 and COLOUR_TO_TRAIN_ID[(0, 0, 0)] == 255  # parking, unlabeled
    rgb = np.array([[[128, 64, 128], [250, 170, 160], [1, 2, 3], [119, 11, 32]]], np.uint8)
    train_ids, off = colours_to_train_ids(rgb)
    assert train_ids.tolist() == [[0, 255, 255, 18]] and off == 1


def test_off_palette_pixels_are_ignored_and_reported_once_per_run(tmp_path):
    written = write_gta5_form(tmp_path, "gta5_color", count=4)
    for stem in ("00002", "00003"):  # a stray colour in two files: 3 + 1 pixels
        path = tmp_path / "labels" / f"{stem}.png"
        rgb = np.array(Image.open(path))
        rgb[0, : (3 if stem == "00002" else 1)] = (1, 2, 3)
        save_png(path, rgb)
    ds = GTA5Dataset(tmp_path, FULL)
    assert ds.label_form == "color"
    with pytest.warns(UserWarning, match=r"00002\.png: 3 label pixels have colours outside the Cityscapes palette"):
        item = ds[1]
    assert (item["label"][0, :3] == 255).all()
    expected = expected_train_ids(written["00002"], "gta5_color")
    assert torch.equal(item["label"][:, 3:], torch.from_numpy(expected[:, 3:]).long())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: the second file stays quiet
        ds[2]
    # through two DataLoader workers: the count and the "reported" flag are shared by the workers, so one of
    # them reports (pytest keeps warnings raised in forked workers to itself, hence the flag is what is checked)
    fresh = GTA5Dataset(tmp_path, FULL)
    batches = list(DataLoader(fresh, batch_size=1, num_workers=2))
    assert len(batches) == 4 and (batches[1]["label"][0, 0, :3] == 255).all()
    assert fresh.off_palette == (4, 2) and int(fresh._off_palette_reported) == 1


def test_label_form_override_that_does_not_fit_names_the_file(tmp_path):
    write_gta5_form(tmp_path, "gta5_trainids", count=2)
    ds = GTA5Dataset(tmp_path, FULL, label_form="color")
    assert ds.label_form_notes == ["set by label_form"]
    with pytest.raises(DatasetError, match=r"labels/00001\.png: label PNG is 8-bit greyscale, expected 8-bit RGB/"
                                           r".* for the color labels of GTA5 .* \(2 of 4 files fail"):
        ds.check_files()
    with pytest.raises(DatasetError, match=r"labels/00001\.png: colour label PNG has mode 'L', expected an 8-bit RGB"):
        ds[0]
    with pytest.raises(ConfigError, match=r"data.source.label_form.* is not one of 'auto', 'label_ids'"):
        load_config(REPO / "configs/synthetic/gta5_bisenet.yaml", ["data.source.label_form=colour"])


def test_summary_prints_the_form_of_each_role(tmp_path, capsys):
    write_gta5_form(tmp_path / "GTA5", "gta5_color")
    write_cityscapes_form(tmp_path / "Cityscapes", "cityscapes_course")
    config = tmp_path / "forms.yaml"
    config.write_text(f"data:\n  source: {{name: gta5, root: '{tmp_path / 'GTA5'}', size: {FULL}}}\n"
                      f"  target: {{name: cityscapes, root: '{tmp_path / 'Cityscapes'}', split: train, size: {FULL}}}\n"
                      f"  val: {{name: cityscapes, root: '{tmp_path / 'Cityscapes'}', split: val, size: {FULL}}}\n"
                      f"  cache: null\n")
    summary.main(["--config", str(config)])
    out = capsys.readouterr().out
    assert "source  GTA5 colour labels: labels/NNNNN.png are RGB in the Cityscapes palette" in out
    assert "target  Cityscapes course zip layout (images/), images only" in out
    assert "val     Cityscapes course zip: images/ + gtFine/*_gtFine_labelTrainIds.png holding train ids" in out
    assert "cache: off" in out


# ------------------------------------------------------------------- each form through train.py and eval.py
def _config_for(form: str, tmp_path: Path) -> list[str]:
    data = tmp_path / "data"
    if form in GTA5_FORMS:
        write_gta5_form(data / "GTA5", form, count=4)
        write_cityscapes_form(data / "Cityscapes", "cityscapes_official", cities={"train": ["ulm"], "val": ["lindau"]})
        source = {"name": "gta5", "root": data / "GTA5"}
    else:
        write_cityscapes_form(data / "Cityscapes", form, cities={"train": ["ulm", "jena"], "val": ["lindau"]})
        source = {"name": "cityscapes", "root": data / "Cityscapes", "split": "train"}
    overrides = {f"data.source.{k}": v for k, v in source.items()}
    overrides.update({"data.target.name": "cityscapes", "data.target.root": data / "Cityscapes",
                      "data.target.split": "train", "data.val.name": "cityscapes",
                      "data.val.root": data / "Cityscapes", "data.val.split": "val",
                      "data.cache": tmp_path / "cache", "train.iters": 2, "train.checkpoint_interval": 2})
    return tiny_overrides(data, **overrides)


@pytest.mark.parametrize("form", ["cityscapes_official", "cityscapes_trainids", "cityscapes_course",
                                  "gta5_official", "gta5_color"])
def test_each_form_trains_and_evaluates_through_the_clis(tmp_path, form, capsys):
    from rtda import engine as train
    from rtda import evaluation as evaluator

    overrides = _config_for(form, tmp_path)
    config = str(REPO / "configs/synthetic/gta5_bisenet.yaml")
    cfg = load_config(config, overrides)
    source = build_dataset(cfg.data.source, cfg, "source")
    assert source.label_form == ENCODING[form]
    assert train.main(["--config", config, "--work-dir", str(tmp_path / "runs"), *overrides]) == 0
    (checkpoint,) = (tmp_path / "runs").glob("*/*/last.pt")
    capsys.readouterr()
    assert evaluator.main(["--config", config, "--checkpoint", str(checkpoint), *overrides]) == 0
    out = capsys.readouterr().out
    assert "2 validation images" in out and "mIoU" in out
