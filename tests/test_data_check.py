"""Data errors before the first step (issue 15, data side): the pre-flight header check, the full content scan
`python -m rtda.datasets --check`, and a synthetic generator that never writes over data it did not write."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rtda.datasets.__main__ as cli
from rtda.config import ConfigError, SyntheticConfig
from rtda.datasets import CityscapesDataset, DatasetError, GTA5Dataset, synthetic

from conftest import HEIGHT, WIDTH, save_png, write_cityscapes_form, write_gta5_form

FULL = [WIDTH, HEIGHT]
# every city of Cityscapes (fine and coarse), none of which a synthetic name may reuse
REAL_CITIES = set("""aachen bochum bremen cologne darmstadt dusseldorf erfurt hamburg hanover jena krefeld
monchengladbach strasbourg stuttgart tubingen ulm weimar zurich frankfurt lindau munster berlin bielefeld bonn
leverkusen mainz munich augsburg bad-honnef bamberg bayreuth dortmund dresden duisburg erlangen freiburg
heidelberg heilbronn karlsruhe konigswinter konstanz mannheim muhlheim-ruhr nuremberg oberhausen saarbrucken
schweinfurt troisdorf wuppertal wurzburg""".split())


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- pre-flight
def test_preflight_passes_a_good_tree_and_counts_the_files(tmp_path):
    write_cityscapes_form(tmp_path, "cityscapes_official")
    assert CityscapesDataset(tmp_path, "train", FULL).check_files() == 8
    assert CityscapesDataset(tmp_path, "train", FULL, labels=False).check_files() == 4


def test_preflight_names_a_missing_file(tmp_path):
    write_gta5_form(tmp_path, "gta5_official", count=3)
    ds = GTA5Dataset(tmp_path, FULL)
    (tmp_path / "labels/00002.png").unlink()  # gone after the loader was built (a flaky mount, a cleanup)
    with pytest.raises(DatasetError) as info:
        ds.check_files()
    assert str(info.value) == f"{tmp_path}/labels/00002.png: missing (expected a PNG file here)"


def test_preflight_names_truncated_and_wrong_mode_labels(tmp_path):
    write_cityscapes_form(tmp_path, "cityscapes_official", cities={"val": ["lindau"]}, per_city=3)
    gt = tmp_path / "gtFine/val/lindau"
    truncated = gt / "lindau_000000_000019_gtFine_labelIds.png"
    truncated.write_bytes(truncated.read_bytes()[:-30])
    ds = CityscapesDataset(tmp_path, "val", FULL)
    with pytest.raises(DatasetError, match=f"^{truncated}: truncated PNG \\(no end chunk IEND\\): expected a complete "
                                           "PNG file"):
        ds.check_files()
    write_cityscapes_form(tmp_path, "cityscapes_official", cities={"val": ["lindau"]}, per_city=3)  # repaired
    rgb = gt / "lindau_000001_000019_gtFine_labelIds.png"
    save_png(rgb, np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    sixteen = gt / "lindau_000002_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint16)).save(sixteen)
    ds = CityscapesDataset(tmp_path, "val", FULL)
    with pytest.raises(DatasetError) as info:
        ds.check_files()
    message = str(info.value)
    assert message.startswith(f"{rgb}: label PNG is 8-bit RGB, expected 8-bit greyscale/8-bit palettised for the "
                              "label_ids labels of Cityscapes")
    assert message.endswith("(2 of 6 files fail the pre-flight check)") and "\n" not in message


def test_preflight_names_a_mispaired_label_size(tmp_path):
    write_gta5_form(tmp_path, "gta5_trainids", count=2)
    save_png(tmp_path / "labels/00002.png", np.zeros((WIDTH, HEIGHT), np.uint8))  # portrait: another frame's label
    with pytest.warns(UserWarning, match="1 of 2 label maps differ in size"):
        ds = GTA5Dataset(tmp_path, FULL)
    with pytest.raises(DatasetError, match=r"labels/00002\.png: label is 64x128, its image .*00002\.png is 128x64: "
                                           r"expected the same size \(or the same aspect ratio, resized\)"):
        ds.check_files()


def test_preflight_reads_headers_only(tmp_path, monkeypatch):
    """No decoding: PIL is never asked to open a file."""
    write_gta5_form(tmp_path, "gta5_color", count=3)
    ds = GTA5Dataset(tmp_path, FULL)
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("check_files decoded a file"))
    assert ds.check_files() == 6


# -------------------------------------------------------------------------------------- the full scan
def _config(tmp_path: Path, gta5: Path, cityscapes: Path) -> Path:
    config = tmp_path / "check.yaml"
    config.write_text(f"data:\n  source: {{name: gta5, root: '{gta5}', size: {FULL}}}\n"
                      f"  target: {{name: cityscapes, root: '{cityscapes}', split: train, size: {FULL}}}\n"
                      f"  val: {{name: cityscapes, root: '{cityscapes}', split: val, size: {FULL}}}\n  cache: null\n")
    return config


def test_check_cli_names_each_bad_file(tmp_path, capsys):
    write_gta5_form(tmp_path / "GTA5", "gta5_color", count=5)
    write_cityscapes_form(tmp_path / "cs", "cityscapes_official", per_city=3)
    config = _config(tmp_path, tmp_path / "GTA5", tmp_path / "cs")
    assert cli.main(["--config", str(config), "--check", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "bad:" not in out and "source: 5 items of GTA5" in out and ": 0 bad files" in out

    label = tmp_path / "GTA5/labels/00004.png"
    rgb = np.array(Image.open(label))
    rgb[:2, :5] = (1, 2, 3)  # 10 off-palette pixels: reported, not bad
    save_png(label, rgb)
    val = tmp_path / "cs/gtFine/val/frankfurt"
    out_of_range = val / "frankfurt_000001_000019_gtFine_labelIds.png"
    save_png(out_of_range, np.full((HEIGHT, WIDTH), 77, np.uint8))
    broken = val / "frankfurt_000002_000019_gtFine_labelIds.png"
    broken.write_bytes(broken.read_bytes()[:-40])
    image = tmp_path / "cs/leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"
    data = bytearray(image.read_bytes())
    data[200:260] = bytes(60)  # corrupt inside: the header and end chunk are intact, the pixels are not
    image.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as info:
        cli.main(["--config", str(config), "--check", "--images", "--workers", "2"])
    assert info.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    bad = [line for line in lines if line.startswith("bad: ")]
    assert len(bad) == 3, bad  # one line per bad file, even when the header and the content both fail
    assert any(str(broken) in line and "truncated PNG" in line for line in bad)
    assert any(str(out_of_range) in line and "values 77 are not Cityscapes label ids (expected 0..33)" in line
               for line in bad)
    assert any(str(image) in line and "unreadable or truncated image" in line for line in bad)
    assert any(line.startswith("val: 3 items of Cityscapes") and "images and labels decoded: 3 bad files" in line
               for line in lines)
    assert any("source: 10 label pixels in 1 file have colours outside the Cityscapes palette" in line
               and "00004.png (10)" in line for line in lines)


# ------------------------------------------------------------------------------- the synthetic generator
TINY = SyntheticConfig(num_source=1, num_target=3, num_val=3, height=32, width=64, seed=0)


def test_generator_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    data = tmp_path / "data"
    write_gta5_form(data / "GTA5", "gta5_official", count=2)  # real data where --out points
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(data), "--num-source", "1", "--num-target", "2", "--height", "32", "--width", "64"])
    err = capsys.readouterr().err
    assert f"--out {data}: is not empty and has no readable synthetic.json" in err and "refusing" in err
    with pytest.raises(ConfigError, match="is not empty"):
        synthetic.generate(data, TINY)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*a_file: is a file, expected a folder"):
        synthetic.generate(tmp_path / "a_file", TINY)
    assert snapshot(tmp_path) == {**before, "a_file": hashlib.sha256(b"mine").hexdigest()}


def test_generator_rewrites_only_its_own_tree_with_the_same_settings(tmp_path):
    out = tmp_path / "syn"
    synthetic.generate(out, TINY)
    first = snapshot(out)
    assert "synthetic.partial" not in first
    synthetic.generate(out, TINY)  # e.g. after an interruption: the same tree again
    assert snapshot(out) == first
    with pytest.raises(ConfigError, match=r"other settings \(height: 32 on disk, 64 asked for\)"):
        synthetic.generate(out, SyntheticConfig(**{**TINY.__dict__, "height": 64}))
    (out / synthetic.PARTIAL).write_text("interrupted")
    with pytest.raises(ConfigError, match="an interrupted synthetic generation"):
        synthetic.ensure_generated(out, TINY)


def test_generated_cityscapes_names_are_not_real_cityscapes_names(tmp_path):
    out = synthetic.generate(tmp_path / "syn", TINY)
    cities = {p.name for p in (out / "Cityscapes/leftImg8bit").glob("*/*")}
    assert cities and not cities & REAL_CITIES and all(c.startswith("synth") for c in cities)
    assert not (set(synthetic.TRAIN_CITIES) | set(synthetic.VAL_CITIES)) & REAL_CITIES
    stems = sorted(p.name for p in (out / "Cityscapes/gtFine/train").rglob("*_gtFine_labelIds.png"))
    assert stems[0] == "synthtrain0_000000_000019_gtFine_labelIds.png"


def test_photo_like_frames_are_photo_sized_and_the_scene_is_unchanged(tmp_path):
    plain = synthetic.generate(tmp_path / "plain", TINY)
    photo = synthetic.generate(tmp_path / "photo", TINY, photo=True)
    assert json.loads((photo / synthetic.MANIFEST).read_text())["photo_like"] is True
    a = np.array(Image.open(plain / "GTA5/images/00001.png"), np.int16)
    b = np.array(Image.open(photo / "GTA5/images/00001.png"), np.int16)
    assert 2 < np.abs(a - b).mean() < 4  # sensor noise of std 3.5 on the same scene
    assert (photo / "GTA5/labels/00001.png").read_bytes() == (plain / "GTA5/labels/00001.png").read_bytes()
    assert (photo / "GTA5/images/00001.png").stat().st_size > 2 * (plain / "GTA5/images/00001.png").stat().st_size
