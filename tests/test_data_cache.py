"""The prepared cache (datasets/cache.py): byte-identical items, never stale, never half-used, resumable, and
nothing written outside its folder; `python -m rtda.datasets prepare`."""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rtda.datasets.__main__ as cli
from rtda.config import AugmentConfig
from rtda.datasets import CityscapesDataset, GTA5Dataset, cache
from rtda.datasets.cache import PrepareInterrupted, prepare_dataset
from rtda.datasets.transforms import Augment

from conftest import HEIGHT, WIDTH, save_png, write_cityscapes_form, write_gta5_form

# "the cache for these files is not prepared" is expected wherever a test builds a set before preparing it
pytestmark = pytest.mark.filterwarnings("ignore:.*cache for these files and settings:UserWarning")
SIZE = [WIDTH // 2, HEIGHT // 2]  # a resize happens, as at the protocol sizes
AUGMENT = Augment(AugmentConfig(hflip=0.5, scale_crop=0.5, color_jitter=0.5, blur=0.5, noise=0.5))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_items(a, b) -> None:
    assert len(a) == len(b)
    for index in range(len(a)):
        x, y = a[index], b[index]
        assert x.keys() == y.keys() and x["name"] == y["name"]
        for key in ("image", "label"):
            if key in x:
                assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape
                assert x[key].stride() == y[key].stride()
                assert torch.equal(x[key], y[key]), (index, key)


@pytest.mark.parametrize("workers", [1, 2])
def test_cached_items_are_byte_identical_to_uncached(tmp_path, workers):
    write_gta5_form(tmp_path / "GTA5", "gta5_color", count=5)
    cache_dir = tmp_path / "cache"
    source = GTA5Dataset(tmp_path / "GTA5", SIZE, augment=AUGMENT, seed=3, cache=cache_dir)
    assert source.cached == {"images": False, "labels": False}
    prepare_dataset(source, "source", workers=workers, progress=False)
    cached = GTA5Dataset(tmp_path / "GTA5", SIZE, augment=AUGMENT, seed=3, cache=cache_dir)
    assert cached.cached == {"images": True, "labels": True}
    plain = GTA5Dataset(tmp_path / "GTA5", SIZE, augment=AUGMENT, seed=3, cache=None)
    for epoch in (0, 1):  # augmentations still run per sample, after the cache
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        assert_same_items(cached, plain)


def test_full_size_val_labels_and_images_only_targets(tmp_path):
    write_cityscapes_form(tmp_path / "cs", "cityscapes_official")
    cache_dir = tmp_path / "cache"
    val = CityscapesDataset(tmp_path / "cs", "val", SIZE, full_labels=True, cache=cache_dir)
    target = CityscapesDataset(tmp_path / "cs", "train", SIZE, labels=False, cache=cache_dir)
    prepare_dataset(val, "val", workers=1, progress=False)
    prepare_dataset(target, "target", workers=1, progress=False)
    cached_val = CityscapesDataset(tmp_path / "cs", "val", SIZE, full_labels=True, cache=cache_dir)
    assert cached_val.cached == {"images": True, "labels": True}
    assert cached_val[0]["label"].shape == (HEIGHT, WIDTH) and cached_val[0]["image"].shape == (3, HEIGHT // 2, WIDTH // 2)
    assert_same_items(cached_val, CityscapesDataset(tmp_path / "cs", "val", SIZE, full_labels=True))
    assert_same_items(CityscapesDataset(tmp_path / "cs", "train", SIZE, labels=False, cache=cache_dir),
                      CityscapesDataset(tmp_path / "cs", "train", SIZE, labels=False))
    # the train split's labelled source shares the target's image entry: only its labels are new
    source = CityscapesDataset(tmp_path / "cs", "train", SIZE, cache=cache_dir)
    assert source.cached == {"images": True, "labels": False}
    assert_same_items(source, CityscapesDataset(tmp_path / "cs", "train", SIZE))


def test_a_changed_size_or_file_never_reads_a_stale_cache(tmp_path):
    written = write_gta5_form(tmp_path / "GTA5", "gta5_official", count=4)
    cache_dir = tmp_path / "cache"
    prepare_dataset(GTA5Dataset(tmp_path / "GTA5", SIZE, cache=cache_dir), "source", workers=1, progress=False)
    # another size: another entry, not prepared, reported once, and the files are read
    with pytest.warns(UserWarning, match=r"the images cache for these files and settings is not prepared"):
        other = GTA5Dataset(tmp_path / "GTA5", [WIDTH, HEIGHT], cache=cache_dir)
    assert other.cached == {"images": False, "labels": False}
    assert other[0]["image"].shape == (3, HEIGHT, WIDTH)
    # a label file changed since prepare: that entry is unused until prepare redoes that one item
    label = tmp_path / "GTA5/labels/00003.png"
    save_png(label, np.full((HEIGHT, WIDTH), 7, np.uint8))
    os.utime(label, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    changed = GTA5Dataset(tmp_path / "GTA5", SIZE, cache=cache_dir)
    assert changed.cached == {"images": True, "labels": False}
    assert (changed[2]["label"] == 0).all()  # road, from the file: not the stale cached label
    calls = []
    real_work = cache._work
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "_work", lambda task: calls.append(task) or real_work(task))
        prepare_dataset(changed, "source", workers=1, progress=False)
    assert [index for index, _ in calls] == [2]
    again = GTA5Dataset(tmp_path / "GTA5", SIZE, cache=cache_dir)
    assert again.cached == {"images": True, "labels": True}
    assert (again[2]["label"] == 0).all() and not np.array_equal(written["00003"], np.full_like(written["00003"], 7))


def test_an_interrupted_prepare_is_never_half_used_and_continues(tmp_path):
    write_cityscapes_form(tmp_path / "cs", "cityscapes_course", per_city=3)
    cache_dir = tmp_path / "cache"
    ds = CityscapesDataset(tmp_path / "cs", "train", SIZE, cache=cache_dir)
    real_work, calls = cache._work, []

    def interrupted(task):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(task[0])
        return real_work(task)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "_work", interrupted)
        with pytest.raises(PrepareInterrupted, match=r"interrupted: 2 of 6 source items are in .* run the same command"):
            prepare_dataset(ds, "source", workers=1, progress=False)
    assert [e.status() for e in ds.cache_entries()] == ["incomplete (2 of 6 items)"] * 2
    with pytest.warns(UserWarning, match=r"is incomplete \(2 of 6 items\).*reading the original files"):
        half = CityscapesDataset(tmp_path / "cs", "train", SIZE, cache=cache_dir)
    assert half.cached == {"images": False, "labels": False}
    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "_work", lambda task: calls.append(task[0]) or real_work(task))
        prepare_dataset(ds, "source", workers=1, progress=False)
    assert sorted(calls) == [2, 3, 4, 5]  # only what was missing
    done = CityscapesDataset(tmp_path / "cs", "train", SIZE, cache=cache_dir)
    assert done.cached == {"images": True, "labels": True}
    assert_same_items(done, CityscapesDataset(tmp_path / "cs", "train", SIZE))


def test_prepare_cli_writes_only_inside_its_cache_folder(tmp_path, capsys):
    write_gta5_form(tmp_path / "GTA5", "gta5_color", count=3)
    write_cityscapes_form(tmp_path / "Cityscapes", "cityscapes_official")
    config = tmp_path / "prepare.yaml"
    config.write_text(f"data:\n  source: {{name: gta5, root: '{tmp_path / 'GTA5'}', size: {SIZE}}}\n"
                      f"  target: {{name: cityscapes, root: '{tmp_path / 'Cityscapes'}', split: train, size: {SIZE}}}\n"
                      f"  val: {{name: cityscapes, root: '{tmp_path / 'Cityscapes'}', split: val, size: {SIZE}}}\n"
                      f"  cache: '{tmp_path / 'cache'}'\n"
                      "adapt: {name: fda}\n")
    before = snapshot(tmp_path)
    assert cli.main(["prepare", "--config", str(config), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("cache/")} == before
    assert "item/s" in captured.err  # the progress bar shows the rate
    assert captured.out.count(" ready") == 5 and "source: 3 items of GTA5" in captured.out
    # everything is read from the cache now, and a second run has nothing to do
    assert cli.main(["prepare", "--config", str(config), "--quiet"]) == 0
    assert "item/s" not in capsys.readouterr().err
    cli.main(["--config", str(config), "--max-images", "1"])
    out = capsys.readouterr().out
    assert "source  images ready, labels ready" in out and "target  images ready" in out
    # a size change: new entries, the old ones listed as unused (never deleted)
    assert cli.main(["prepare", "--config", str(config), "--quiet", "data.source.size=[32,16]",
                     "--roles", "source"]) == 0
    out = capsys.readouterr().out
    assert "other entries in" in out and "not read by this config" in out


def test_prepare_errors_are_one_line(tmp_path, capsys):
    write_gta5_form(tmp_path / "GTA5", "gta5_official", count=2)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: {{name: gta5, root: '{tmp_path / 'GTA5'}', size: {SIZE}}}\n  cache: null\n")
    assert cli.main_prepare(["--config", str(config), "--roles", "source"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: data.cache = null (the cache is off): name a folder, e.g. data.cache=data/cache, and use the same "
        "value when training"]
    assert cli.main_prepare(["--config", str(config), "--roles", "sauce", f"data.cache={tmp_path / 'c'}"]) == 1
    assert "--roles sauce: expected a comma-separated subset of source, target, val" in capsys.readouterr().err
    # a label that fails to decode stops prepare with its name; what was done is kept
    label = tmp_path / "GTA5/labels/00002.png"
    label.write_bytes(label.read_bytes()[:60])  # truncated: the header is intact, the pixels are not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main_prepare(["--config", str(config), "--roles", "source", "--quiet", f"data.cache={tmp_path / 'c'}"])
    assert code == 1 and "labels/00002.png: unreadable or truncated label PNG" in capsys.readouterr().err


def test_without_pyspng_the_same_pixels_and_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    import rtda.datasets.io as io

    write_gta5_form(tmp_path / "GTA5", "gta5_trainids", count=2)
    with_spng = GTA5Dataset(tmp_path / "GTA5", SIZE)
    fast = [with_spng[i] for i in range(2)]
    monkeypatch.setattr(io, "spng", None)
    assert_same_items(GTA5Dataset(tmp_path / "GTA5", SIZE), fast)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: {{name: gta5, root: '{tmp_path / 'GTA5'}', size: {SIZE}}}\n"
                      f"  cache: '{tmp_path / 'cache'}'\n")
    assert cli.main_prepare(["--config", str(config), "--roles", "source", "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "pyspng" in line]
    assert notes == ["note: pyspng is not installed: PNGs are decoded with PIL, about 1.4x slower (pip install pyspng)"]


def test_benchmark_data_mode_reports_both_forms(tmp_path, capsys):
    import json

    from rtda import bench as benchmark

    write_gta5_form(tmp_path / "GTA5", "gta5_color", count=3)
    write_cityscapes_form(tmp_path / "cs", "cityscapes_official")
    config = tmp_path / "b.yaml"
    config.write_text(f"data:\n  source: {{name: gta5, root: '{tmp_path / 'GTA5'}', size: {SIZE}}}\n"
                      f"  target: {{name: cityscapes, root: '{tmp_path / 'cs'}', split: train, size: {SIZE}}}\n"
                      f"  val: {{name: cityscapes, root: '{tmp_path / 'cs'}', split: val, size: {SIZE}}}\n"
                      f"  augment: {{hflip: 0.5}}\n  cache: '{tmp_path / 'cache'}'\n")
    before = snapshot(tmp_path)
    assert benchmark.main(["--data", "--config", str(config), "--iters", "2", "--workers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["roles"]) == {"source", "target"} and result["workers"] == 1
    source = result["roles"]["source"]
    assert source["items"] == 2 and source["augment"] and source["size"] == f"{SIZE[0]}x{SIZE[1]}"
    assert min(source["uncached"]["per_core"], source["cached"]["per_worker"], source["speedup_per_core"]) > 0
    assert snapshot(tmp_path) == before  # its cache lived in a temporary folder, now gone
    assert benchmark.main(["--data", "--runs", str(tmp_path)]) == 2
