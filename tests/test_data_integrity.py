"""Incomplete data and a damaged cache (issue 27, groups 3 and 4), through `python -m rtda.datasets`: the message,
the exit status, and the files on disk before and after.

Incomplete data: a label without an image (GTA5, Cityscapes) is an error with the counts, as an image without a
label is; a deliberate GTA5 subset is `list_file`. One label-size rule: scored at its stored size, a label of
another size than its image is an error; resized, it is warned about once. The cache: a damaged entry (manifest,
.npy header) is named in one line and the files are read; a damaged item (label or image bytes) is read from its
file with one warning, never reaching training; `--check` verifies every item; format-1 entries are not read."""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rtda.datasets.__main__ as cli
from rtda.datasets import GTA5Dataset

from conftest import HEIGHT, WIDTH, save_png, tiny_overrides, write_cityscapes_form, write_gta5_form

SIZE = [WIDTH // 2, HEIGHT // 2]
# roles left unprepared (the target without adaptation) say so: expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*cache for these files and settings is not prepared:UserWarning")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def config(tmp_path: Path, gta5: Path, cityscapes: Path, cache: Path | None = None, extra: str = "") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  source: {{name: gta5, root: '{gta5}', size: {SIZE}}}\n"
                    f"  target: {{name: cityscapes, root: '{cityscapes}', split: train, size: {SIZE}}}\n"
                    f"  val: {{name: cityscapes, root: '{cityscapes}', split: val, size: {SIZE}}}\n"
                    f"  cache: {repr(str(cache)) if cache else 'null'}\n" + extra)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m rtda.datasets ARGV`."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def trees(tmp_path: Path) -> tuple[Path, Path]:
    write_gta5_form(tmp_path / "GTA5", "gta5_trainids", count=4)
    write_cityscapes_form(tmp_path / "cs", "cityscapes_official", per_city=2)
    return tmp_path / "GTA5", tmp_path / "cs"


# ------------------------------------------------------------------------------------------ incomplete data
def test_a_half_extracted_gta5_is_an_error_with_counts_and_a_list_file_a_subset(tmp_path, capsys):
    gta5, cs = trees(tmp_path)
    for name in ("00002.png", "00004.png"):
        (gta5 / "images" / name).unlink()  # the labels of two frames, their images never extracted
    path = config(tmp_path, gta5, cs)
    before = snapshot(tmp_path)
    code, out, err = run_cli(["--config", str(path)], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: GTA5 {gta5}/labels has 2 labels without an image in {gta5}/images (2 images, 4 labels; missing: "
        "00002.png, 00004.png): expected both folders complete (re-extract the archive), or name a subset on "
        "purpose in data.<role>.list_file"]
    listed = tmp_path / "subset.txt"
    listed.write_text("00001.png\n00003.png\n")
    code, out, _ = run_cli(["--config", str(path), f"data.source.list_file={listed}", "--max-images", "1"], capsys)
    assert code == 0 and "source  gta5" in out
    assert snapshot(tmp_path) == {**before, "subset.txt": hashlib.sha256(listed.read_bytes()).hexdigest()}


def test_a_missing_cityscapes_val_image_is_an_error_with_counts(tmp_path, capsys):
    gta5, cs = trees(tmp_path)
    missing = cs / "leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png"
    missing.unlink()
    path = config(tmp_path, gta5, cs)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["--config", str(path), "--check"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(
        f"error: Cityscapes {cs}/gtFine/val has 1 labels without an image in {cs}/leftImg8bit/val (1 images, 2 labels; "
        "missing images of: frankfurt_000001_000019_gtFine_labelIds.png): expected every image present")
    assert snapshot(tmp_path) == before


def test_a_val_label_of_another_size_is_an_error_when_scored_at_full_size(tmp_path, capsys):
    gta5, cs = trees(tmp_path)
    label = cs / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    save_png(label, np.full((HEIGHT + 2, WIDTH + 4), 7, np.uint8))  # same aspect nearly: not a mispairing
    path = config(tmp_path, gta5, cs, extra="eval: {label_size: full}\n")
    before = snapshot(tmp_path)
    code, _, err = run_cli(["--config", str(path), "--max-images", "1"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: Cityscapes '{cs}' (split 'val'): 1 of 2 label maps differ in size from their image "
        "(frankfurt_000000_000019_gtFine_labelIds.png): expected each label at its image's size, as they are scored "
        "at their stored size (eval.label_size: full); re-extract the labels, or score at the training size with "
        "eval.label_size=protocol"]
    # resized to the training size, image and label meet: the same rule as GTA5, one counted warning
    with pytest.warns(UserWarning, match=r"split 'val'\): 1 of 2 label maps differ in size .* resizing those labels"):
        code, _, _ = run_cli(["--config", str(path), "eval.label_size=protocol", "--max-images", "1"], capsys)
    assert code == 0 and snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- a damaged cache
def prepared(tmp_path: Path, capsys) -> tuple[Path, Path, GTA5Dataset]:
    gta5, cs = trees(tmp_path)
    path = config(tmp_path, gta5, cs, cache=tmp_path / "cache")
    assert cli.main(["prepare", "--config", str(path), "--quiet", "--workers", "1"]) == 0
    capsys.readouterr()
    source = GTA5Dataset(gta5, SIZE, cache=tmp_path / "cache")
    assert source.cached == {"images": True, "labels": True}
    return path, gta5, source


def entry_of(source: GTA5Dataset, kind: str):
    entry = {e.kind: e for e in source.cache_entries()}[kind]
    assert entry.ready()  # reads its manifest
    return entry


def flip(path: Path, offset: int, value: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value if value is not None else data[offset] ^ 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["labels", "images"])
def test_flipped_item_bytes_are_read_from_the_file_and_named_by_check(tmp_path, capsys, kind):
    path, gta5, source = prepared(tmp_path, capsys)
    entry = entry_of(source, kind)
    item = 2
    at = entry.manifest["data_offset"] + item * entry.item_nbytes + 5
    flip(entry.data_path, at, 200 if kind == "labels" else None)  # 200: no train id, an IndexError in the loss
    before = snapshot(tmp_path)
    damaged = GTA5Dataset(gta5, SIZE, cache=tmp_path / "cache")
    plain = GTA5Dataset(gta5, SIZE)
    with pytest.warns(UserWarning, match=rf"{entry.folder}: item 2 \(.*00003\.png\) fails its checksum: reading the "
                                         "file instead") as record:
        got = [damaged[i] for i in range(len(damaged))]
    assert len(record) == 1
    for a, b in zip(got, [plain[i] for i in range(len(plain))]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert int(got[item]["label"].max()) < 19 or int(got[item]["label"].max()) == 255
    code, out, _ = run_cli(["--config", str(path), "--check", "--workers", "1"], capsys)
    bad = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert code == 1 and bad == [f"bad: {entry.folder}: item 2 ({gta5}/{'images' if kind == 'images' else 'labels'}/"
                                 "00003.png) fails its checksum: delete the folder and rerun `python -m rtda.datasets "
                                 "prepare` (training reads the file instead)"]
    assert "source: 4 items of GTA5" in out and "1 bad file (1 in the cache)" in out
    assert snapshot(tmp_path) == before  # --check and the loader changed nothing


def test_a_damaged_npy_header_is_one_line_and_the_files_are_read(tmp_path, capsys):
    path, gta5, source = prepared(tmp_path, capsys)
    entry = entry_of(source, "labels")
    flip(entry.data_path, 30)  # inside the header's dict: np.load would raise ValueError
    before = snapshot(tmp_path)
    with pytest.warns(UserWarning) as record:
        damaged = GTA5Dataset(gta5, SIZE, cache=tmp_path / "cache")
    messages = [str(r.message) for r in record]
    assert messages == [f"{tmp_path / 'cache'}: the labels cache for these files and settings is damaged (the header "
                        f"of data.npy fails its checksum; `prepare` rewrites it) ({entry.folder.name}); reading the "
                        "original files (`python -m rtda.datasets prepare --config FILE` writes or finishes it)"]
    assert damaged.cached == {"images": True, "labels": False}
    assert torch.equal(damaged[1]["label"], GTA5Dataset(gta5, SIZE)[1]["label"])
    code, out, _ = run_cli(["--config", str(path), "--check", "--workers", "1"], capsys)
    assert code == 1 and f"bad: {entry.folder}: the header of data.npy fails its checksum" in out
    assert snapshot(tmp_path) == before
    # prepare rewrites the damaged entry; then everything is read from the cache again
    assert cli.main(["prepare", "--config", str(path), "--quiet", "--workers", "1", "--roles", "source"]) == 0
    assert GTA5Dataset(gta5, SIZE, cache=tmp_path / "cache").cached == {"images": True, "labels": True}


def test_a_format_1_entry_is_named_and_not_read(tmp_path, capsys):
    path, gta5, source = prepared(tmp_path, capsys)
    entry = entry_of(source, "images")
    old = entry.cache_dir / f"images-{entry._key(1)[:16]}"
    entry.folder.rename(old)  # what the previous version left: its manifest had no checksums
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("manifest_crc32", "header_crc32", "items_crc32"):
        del manifest[key]
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": 1, "key": entry._key(1)}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = GTA5Dataset(gta5, SIZE, cache=tmp_path / "cache")
    assert ds.cached == {"images": False, "labels": True}
    assert [f"{old.name} was written by an earlier version without checksums and is not read" in str(r.message)
            for r in record] == [True]


def test_training_on_a_cache_with_flipped_label_bytes_reads_the_files(synthetic_root, tmp_path, capsys):
    """Labels of 200 (no train id) in every cached item: without the checksums an IndexError in the loss mid-run;
    with them each item is read from its file, the run finishes, and nothing of the cache or the data changes."""
    import subprocess

    import train

    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(synthetic_root), str(data)], check=True)
    source_only = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "gta5_bisenet.yaml"
    overrides = [*tiny_overrides(data, **{"train.iters": 2}), f"data.cache={tmp_path / 'cache'}"]
    assert cli.main(["prepare", "--config", str(source_only), "--quiet", "--workers", "1", "--roles", "source",
                     *overrides]) == 0
    labels = next((tmp_path / "cache").glob("labels-*"))
    offset = json.loads((labels / "manifest.json").read_text())["data_offset"]
    body = bytearray(labels.joinpath("data.npy").read_bytes())
    body[offset:] = bytes([200]) * (len(body) - offset)
    labels.joinpath("data.npy").write_bytes(bytes(body))
    before = snapshot(tmp_path / "cache") | snapshot(data)
    work = tmp_path / "runs"
    with pytest.warns(UserWarning, match=rf"{labels}: item \d+ \(.*\) fails its checksum: reading the file instead"):
        code = train.main(["--config", str(source_only), *overrides, "--work-dir", str(work)])
    assert code == 0 and len(list(work.rglob("metrics.json"))) == 1
    assert snapshot(tmp_path / "cache") | snapshot(data) == before
