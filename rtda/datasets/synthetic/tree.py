"""Writing synthetic trees: `generate` writes both domains under a folder, `ensure_generated` (what the data
loaders call for `name: synthetic`) writes one once, atomically, the first time a root is used.

A tree holds

    DIR/GTA5/images/00001.png, DIR/GTA5/labels/00001.png                      (labels: palettised label ids)
    DIR/Cityscapes/leftImg8bit/{train,val}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png
    DIR/Cityscapes/gtFine/{train,val}/{city}/{city}_{seq:06d}_000019_gtFine_labelIds.png   (mode 'L' label ids)
    DIR/synthetic.json                                                          (the parameters used)

A tree's manifest records GENERATOR_VERSION and the settings; a tree with another manifest is refused, never
mixed or overwritten.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image

from rtda.config import ConfigError, SyntheticConfig
from rtda.datasets.synthetic.render import photo_like, render_scene
from rtda.utils.files import output_folder_problem

# The palette of the real GTA5 label PNGs: label id -> Cityscapes colour.
LABEL_PALETTE = [0] * 768
for _label in CITYSCAPES_LABELS:
    if 0 <= _label.id < 256:
        LABEL_PALETTE[3 * _label.id: 3 * _label.id + 3] = _label.color

# clearly synthetic city names (no real Cityscapes city); the loaders sort scenes by name
TRAIN_CITIES = ("synthtrain0", "synthtrain1", "synthtrain2")
VAL_CITIES = ("synthval0", "synthval1", "synthval2")
FRAME = 19  # Cityscapes' annotated frame of each snippet is frame 000019
# zlib level 1 with the run-length strategy (zlib's Z_RLE = 3): as small as the default level 6 on these
# images (PNG's row filters leave runs and small residuals) and several times faster to write
PNG_OPTIONS = {"compress_level": 1, "compress_type": 3}
MANIFEST = "synthetic.json"
PARTIAL = "synthetic.partial"  # present while a tree is being written: a tree with it is incomplete
# The version of the domains drawn by this package: bumped whenever a style or the drawing changes, and written
# into each tree's manifest, so that a tree (and a benchmark's runs) drawn by another version is refused instead of
# silently mixed with this one's.
GENERATOR_VERSION = 4


def cityscapes_stem(split: str, index: int) -> tuple[str, str]:
    """(city, file stem) of the index-th image of a split; the split's cities take turns."""
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    return city, f"{city}_{index:06d}_{FRAME:06d}"


def validate(cfg: SyntheticConfig, cli: bool = False) -> None:
    """Reject sizes and counts the generator cannot draw, naming the config key (or the CLI flag)."""
    minimum = {"num_source": 1, "num_target": 1, "num_val": 1, "height": 32, "width": 64, "seed": 0}
    for key, lo in minimum.items():
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            name = "--" + key.replace("_", "-") if cli else f"data.synthetic.{key}"
            raise ConfigError(f"{name} = {value!r}: expected an int >= {lo}")


def manifest_of(cfg: SyntheticConfig, photo_like: bool = False) -> dict:
    manifest = {"generator": GENERATOR_VERSION, **dataclasses.asdict(cfg)}
    if photo_like:  # only when used, so the manifests of ordinary trees stay what ensure_generated compares
        manifest["photo_like"] = True
    return manifest


def version_name(found: int | None) -> str:
    """A recorded generator version as errors name it (trees and benchmark folders from before the number: None)."""
    return str(found) if found else "unrecorded (3 or older)"


def _differences(found: dict, wanted: dict) -> str:
    if found.get("generator") != wanted.get("generator"):  # the drawing changed: nothing else is comparable
        return (f"generator version {version_name(found.get('generator'))} on disk, "
                f"{wanted.get('generator')} in this code, docs/results/log.md")
    return ", ".join(f"{k}: {found.get(k)!r} on disk, {wanted.get(k)!r} asked for"
                     for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k))


def check_out(out: Path, wanted: dict) -> None:
    """Refuse to write into anything but a new or empty folder or a synthetic tree of the same settings."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, expected a folder (new, empty, or a synthetic tree)")
    problem = output_folder_problem(out)  # under a file, read-only, a symlink loop
    if problem:
        raise ConfigError(f"--out {out}: {problem}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--out {out}: is not empty and has no readable {MANIFEST}, so it is not a synthetic tree "
                          "this generator wrote; refusing to write into it (choose a new or empty folder)") from None
    if found != wanted:
        raise ConfigError(f"--out {out}: holds a synthetic tree generated with other settings "
                          f"({_differences(found, wanted)}); delete it or choose another folder")



def scene_paths(out: Path, domain: str, index: int) -> tuple[Path, Path]:
    """(image path, label path) of the index-th scene of `domain` in the tree at `out` (GTA5 or Cityscapes layout)."""
    if domain == "source":
        return (out / "GTA5" / "images" / f"{index + 1:05d}.png", out / "GTA5" / "labels" / f"{index + 1:05d}.png")
    split = "train" if domain == "target" else "val"
    city, stem = cityscapes_stem(split, index)
    return (out / "Cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            out / "Cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def _save_pair(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path, palettised: bool) -> None:
    Image.fromarray(image, mode="RGB").save(image_path, **PNG_OPTIONS)
    label_img = Image.fromarray(label, mode="L")
    if palettised:  # GTA5 labels are palettised: the pixel values are the ids, the palette colours them
        label_img = label_img.copy()
        label_img.putpalette(LABEL_PALETTE)
    label_img.save(label_path, **PNG_OPTIONS)


def generate(out: str | Path, cfg: SyntheticConfig, progress: bool = False, photo: bool = False) -> Path:
    """Write both domains under `out` and return its path.

    `out` must be new, empty, or a tree this generator wrote with the same settings (then rewritten in place);
    anything else is a ConfigError and nothing is written. `photo`: photo-like frames (see `photo_like`)."""
    validate(cfg)
    out = Path(out)
    wanted = manifest_of(cfg, photo)
    check_out(out, wanted)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(wanted, indent=1) + "\n")  # first: the tree is ours from here on
    (out / PARTIAL).write_text("generation in progress or interrupted; rerun the same command to finish\n")
    jobs = [("source", i) for i in range(cfg.num_source)]
    jobs += [("target", i) for i in range(cfg.num_target)] + [("val", i) for i in range(cfg.num_val)]
    made = set()
    start = time.perf_counter()
    for n, (domain, index) in enumerate(jobs):
        image, label = render_scene(domain, index, cfg.seed, cfg.height, cfg.width)
        if photo:
            image = photo_like(image, cfg.seed, domain, index)
        image_path, label_path = scene_paths(out, domain, index)
        for folder in (image_path.parent, label_path.parent):
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
        _save_pair(image, label, image_path, label_path, palettised=domain == "source")
        if progress and ((n + 1) % 100 == 0 or n + 1 == len(jobs)):
            rate = (n + 1) / (time.perf_counter() - start)
            print(f"\r{n + 1}/{len(jobs)} images, {rate:.0f} images/s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    (out / PARTIAL).unlink()
    return out


def ensure_generated(root: str | Path, cfg: SyntheticConfig) -> Path:
    """Return `root`, generating the synthetic domains there first if it does not exist.

    Safe when several processes (e.g. torchrun ranks) start together: one generates into a temporary
    sibling folder under a lock and renames it into place, so nobody ever sees a half-written tree;
    the others wait for the lock and then reuse the finished folder. An existing root generated with
    other parameters is an error rather than silently stale data.
    """
    validate(cfg)
    root = Path(root)
    if root.is_symlink() and not root.exists():
        raise ConfigError(f"{root}: a symbolic link that cannot be followed (a loop or a missing target); expected "
                          "the synthetic data folder, or a path where it can be generated")
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or if this process dies
            if not root.exists():
                for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed generator
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
                print(f"generating synthetic domains in {root} ...", file=sys.stderr)
                try:
                    generate(tmp, cfg, progress=True)
                    os.rename(tmp, root)
                except BaseException:  # a full disk, Ctrl-C: no half-written tree is left behind
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise ConfigError(f"{root}: exists but has no {MANIFEST}; not a synthetic data root "
                          f"(point `root` elsewhere or delete the folder to generate it)")
    if (root / PARTIAL).exists():
        raise ConfigError(f"{root}: an interrupted synthetic generation ({PARTIAL} is there); rerun "
                          f"`python -m rtda.datasets.synthetic --out {root}` with the same settings, or delete the folder")
    wanted, found = manifest_of(cfg), json.loads(manifest.read_text())
    if found != wanted:
        raise ConfigError(f"{root}: generated with other data.synthetic settings ({_differences(found, wanted)}); "
                          f"delete the folder to regenerate it")
    return root
