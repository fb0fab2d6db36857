"""The synthetic two-domain generator: layout, labels, determinism, class statistics, domain shift."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from cityscapesscripts.helpers.labels import name2label
from PIL import Image

from rtda.config import ConfigError, SyntheticConfig
from rtda.datasets import synthetic
from rtda.datasets.synthetic import ensure_generated, generate, render_scene

TINY = SyntheticConfig(num_source=3, num_target=4, num_val=3, height=64, width=128, seed=3)
VALID_IDS = {label.id for label in CITYSCAPES_LABELS if label.id >= 0}
TRAIN_NAMES = [label.name for label in CITYSCAPES_LABELS if 0 <= label.trainId < 19]
TRAIN_ID = {label.id: label.trainId for label in CITYSCAPES_LABELS if 0 <= label.trainId < 19}


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "data", TINY)


@pytest.fixture(scope="module")
def sample() -> dict:
    """Eight scenes per domain at 128x256, rendered in memory."""
    return {domain: [render_scene(domain, i, 0, 128, 256) for i in range(8)] for domain in ("source", "target")}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_matches_the_real_data_sets(tiny_tree):
    files = _files(tiny_tree)
    gta = [f for f in files if f.startswith("GTA5/")]
    assert gta == [f"GTA5/images/{i:05d}.png" for i in (1, 2, 3)] + [f"GTA5/labels/{i:05d}.png" for i in (1, 2, 3)]
    for split, count, cities in (("train", TINY.num_target, synthetic.TRAIN_CITIES),
                                 ("val", TINY.num_val, synthetic.VAL_CITIES)):
        images = [f for f in files if f.startswith(f"Cityscapes/leftImg8bit/{split}/")]
        labels = [f for f in files if f.startswith(f"Cityscapes/gtFine/{split}/")]
        assert len(images) == len(labels) == count
        for image in images:
            _, _, _, city, name = image.split("/")
            assert city in cities and name.startswith(city + "_") and name.endswith("_000019_leftImg8bit.png")
            assert len(name.split("_")[1]) == 6 and len(name.split("_")[2]) == 6
            label = image.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            assert label in labels
    assert not set(synthetic.TRAIN_CITIES) & set(synthetic.VAL_CITIES)
    assert json.loads((tiny_tree / synthetic.MANIFEST).read_text())["seed"] == TINY.seed


def test_png_modes_sizes_and_label_ids(tiny_tree):
    gta_label = Image.open(tiny_tree / "GTA5/labels/00001.png")
    assert gta_label.mode == "P"  # palettised like the real GTA5 labels, the index is the label id
    palette = gta_label.getpalette()
    road = name2label["road"].id
    assert tuple(palette[3 * road: 3 * road + 3]) == name2label["road"].color
    assert Image.open(tiny_tree / "GTA5/images/00001.png").mode == "RGB"
    cs_labels = sorted((tiny_tree / "Cityscapes/gtFine").rglob("*_gtFine_labelIds.png"))
    assert {Image.open(p).mode for p in cs_labels} == {"L"}
    for path in [tiny_tree / "GTA5/labels/00002.png", *cs_labels]:
        ids = np.asarray(Image.open(path))
        assert ids.shape == (TINY.height, TINY.width)
        assert set(np.unique(ids).tolist()) <= VALID_IDS
        assert (ids == road).any()


def test_same_seed_same_bytes_other_seed_differs(tiny_tree, tmp_path):
    again = generate(tmp_path / "again", TINY)
    files = _files(tiny_tree)
    assert files == _files(again)
    assert all((tiny_tree / f).read_bytes() == (again / f).read_bytes() for f in files)
    image, label = render_scene("target", 1, TINY.seed, TINY.height, TINY.width)
    other_image, other_label = render_scene("target", 1, TINY.seed + 1, TINY.height, TINY.width)
    assert not np.array_equal(label, other_label) and not np.array_equal(image, other_image)
    # train and val are different scenes even at the same index
    assert not np.array_equal(label, render_scene("val", 1, TINY.seed, TINY.height, TINY.width)[1])


def test_class_coverage_and_imbalance(sample):
    for domain, scenes in sample.items():
        ids = np.concatenate([label.ravel() for _, label in scenes])
        counts = np.bincount(ids, minlength=256)
        present = {TRAIN_ID[i] for i in np.flatnonzero(counts) if i in TRAIN_ID}
        # 14 of the 19 classes: wall, fence, rider, train and motorcycle are not drawn (never learnt in the budget)
        assert len(present) >= 14, (domain, sorted(present))
        assert {name2label[n].trainId for n in ("pole", "traffic light", "traffic sign", "bicycle")} <= present  # rare, thin
        share = {name: counts[name2label[name].id] / ids.size for name in TRAIN_NAMES}
        big = ("road", "building", "sky", "vegetation")
        assert sum(share[n] for n in big) > 0.55, (domain, share)
        small = ("pole", "traffic light", "traffic sign", "bicycle")
        assert all(share[n] < 0.035 for n in small), (domain, share)  # poles 2-3%, the others under 1%
        assert min(share[n] for n in big) > max(share[n] for n in small if n != "pole")
        assert share["pole"] < min(share["road"], share["building"]) / 5


def _class_means(scenes, name: str) -> np.ndarray:
    pixels = np.concatenate([image[label == name2label[name].id] for image, label in scenes])
    return pixels.astype(np.float64).mean(axis=0)


def test_domains_differ_statistically(sample):
    src, tgt = sample["source"], sample["target"]
    # per-class colour distributions move ...
    distance = {n: np.linalg.norm(_class_means(src, n) - _class_means(tgt, n))
                for n in ("road", "sidewalk", "building", "sky", "vegetation", "terrain")}
    assert np.mean(list(distance.values())) > 30, distance
    # ... the source has the game's hard edges, the target soft edges (optics) and noisy surfaces (sensor):
    # the grey-level step across label boundaries, relative to the step between pixels of one region
    def edge_contrast(scenes):
        ratios = []
        for image, label in scenes:
            step = np.abs(np.diff(image.astype(np.float32).mean(axis=2), axis=1))
            boundary = label[:, 1:] != label[:, :-1]
            ratios.append(step[boundary].mean() / step[~boundary].mean())
        return np.mean(ratios)
    assert edge_contrast(src) > 2 * edge_contrast(tgt)
    # ... the layout statistics move too: only the target shows the ego vehicle, and the sky share changes
    ego = name2label["ego vehicle"].id
    assert not any((label == ego).any() for _, label in src) and all((label == ego).any() for _, label in tgt)
    # ... while the classes keep their meaning: in both domains the sky is brighter than the road
    for scenes in (src, tgt):
        assert _class_means(scenes, "sky").mean() > _class_means(scenes, "road").mean()


def test_ensure_generated_creates_once_then_reuses(tmp_path):
    root = tmp_path / "synthetic"
    (tmp_path / ".synthetic.tmp-999999").mkdir()  # what a killed generator leaves behind
    assert ensure_generated(root, TINY) == root
    marker = root / "GTA5/images/00001.png"
    stamp = marker.stat().st_mtime_ns
    assert ensure_generated(str(root), TINY) == root
    assert marker.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["synthetic"]
    with pytest.raises(ConfigError, match="height"):
        ensure_generated(root, SyntheticConfig(**{**TINY.__dict__, "height": 96}))
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match="synthetic.json"):
        ensure_generated(tmp_path / "other", TINY)


def test_a_tree_drawn_by_another_generator_version_is_refused(tmp_path):
    root = ensure_generated(tmp_path / "synthetic", TINY)
    manifest = root / synthetic.MANIFEST
    found = json.loads(manifest.read_text())
    assert found["generator"] == synthetic.GENERATOR_VERSION
    manifest.write_text(json.dumps({**found, "generator": synthetic.GENERATOR_VERSION - 1}))
    with pytest.raises(ConfigError, match=rf"generator version {synthetic.GENERATOR_VERSION - 1} on disk, "
                                          rf"{synthetic.GENERATOR_VERSION} in this code.*delete the folder"):
        ensure_generated(root, TINY)
    del found["generator"]  # a tree written before the version was recorded
    manifest.write_text(json.dumps(found))
    with pytest.raises(ConfigError, match=r"generator version unrecorded \(3 or older\) on disk"):
        ensure_generated(root, TINY)
    with pytest.raises(ConfigError, match="generator version unrecorded"):
        synthetic.generate(root, TINY)  # nor rewritten in place


def test_ensure_generated_is_safe_when_racing(tmp_path, monkeypatch):
    """Two callers at once (like torchrun ranks) get one complete tree, generated once. Threads stand in for
    processes: each opens the lock file itself, and flock locks separate opens against each other."""
    root = tmp_path / "synthetic"
    calls = []
    real_generate = synthetic.generate
    monkeypatch.setattr(synthetic.tree, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    start = threading.Barrier(2)

    def rank(_):
        start.wait()
        return ensure_generated(root, TINY)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(rank, range(2))) == [root, root]
    assert len(calls) == 1
    assert len(list((root / "GTA5/images").iterdir())) == TINY.num_source
    assert len(list((root / "Cityscapes/leftImg8bit/val").rglob("*.png"))) == TINY.num_val
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="width"):
        generate(tmp_path / "x", SyntheticConfig(width=16))
    with pytest.raises(ConfigError, match="num_source"):
        ensure_generated(tmp_path / "y", SyntheticConfig(num_source=0))
    with pytest.raises(ValueError, match="domain"):
        render_scene("gta", 0, 0, 64, 128)
    assert not (tmp_path / "y").exists()


def test_cli_writes_the_tree(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--num-source", "1", "--num-target", "4",
                    "--height", "32", "--width", "64", "--seed", "1"])
    cfg = json.loads((tmp_path / "cli" / synthetic.MANIFEST).read_text())
    assert cfg["num_val"] == 1 and cfg["height"] == 32  # --num-val defaults to num-target // 4
    assert Image.open(tmp_path / "cli/GTA5/images/00001.png").size == (64, 32)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "bad"), "--height", "4"])
    assert "height" in capsys.readouterr().err


def test_the_randomised_look_draws_every_part_colour_anew_per_image(sample):
    """The pretraining domain (benchmark.py --pretrain-synthetic): the same kind of scene, but a road (or any part)
    can have any colour, where each benchmark domain keeps a part's colour near its own mean."""
    def road_colours(scenes):
        return np.stack([image[label == synthetic.ID["road"]].mean(0) for image, label in scenes])

    randomised = [render_scene("randomised", i, 0, 128, 256) for i in range(8)]
    assert road_colours(randomised).std(0).mean() > 1.8 * road_colours(sample["source"]).std(0).mean()
    drawn = {int(v) for _, label in randomised for v in np.unique(label)}
    assert drawn >= {synthetic.ID[name] for name in ("road", "sky", "car", "person", "pole")}
