"""Looking at built data sets: class pixel counts, the label-form and cache reports, and the full content scan
(`check`: every label decoded and checked against its set's label form, optionally every image, and every
item of the set's prepared cache entries against its checksum)."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys

import numpy as np

from rtda.datasets.gta5 import GTA5Dataset
from rtda.datasets.io import DatasetError, read_image
from rtda.datasets.labels import CLASS_NAMES, IGNORE_INDEX


def class_pixel_counts(dataset, max_images: int | None = None) -> np.ndarray:
    """int64 [256] pixel counts per train id over (an evenly spaced subset of) the data set's label maps."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int) if count else []
    counts = np.zeros(256, dtype=np.int64)
    for index in indices:
        counts += np.bincount(dataset.read_train_ids(int(index)).ravel(), minlength=256)
    return counts


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def positive(text: str) -> int:
    """argparse type: a positive int."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive number")
    return value


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def print_roles(cfg, built: dict) -> None:
    """Print one line per role: data set, split, number of images, root."""
    print(f"{'role':8s}{'data set':12s}{'split':8s}{'images':>8s}  root")
    for role, ds in built.items():
        ds_cfg = getattr(cfg.data, role)
        split = "-" if isinstance(ds, GTA5Dataset) else ds_cfg.split  # GTA5 has no split folders
        print(f"{role:8s}{ds_cfg.name:12s}{split:8s}{len(ds):8d}  {ds_cfg.root}")


def print_class_frequencies(counts: dict[str, np.ndarray], max_images: int | None) -> None:
    """Print the class pixel frequency table (%) of `class_pixel_counts` results, one column per role."""
    print(f"\nclass pixel frequency (%), over {max_images or 'all'} label maps per set")
    print(f"{'class':16s}" + "".join(f"{role:>10s}" for role in counts))
    totals = {role: max(int(c.sum()), 1) for role, c in counts.items()}
    rows = [(name, train_id) for train_id, name in enumerate(CLASS_NAMES)] + [("ignore (255)", IGNORE_INDEX)]
    for name, train_id in rows:
        print(f"{name:16s}" + "".join(f"{100 * c[train_id] / totals[role]:10.2f}" for role, c in counts.items()))


def print_forms(built: dict) -> None:
    """Print each role's label form and how it was found."""
    print("\nlabel form per role (told from the values and modes of the label files; data.<role>.label_form overrides):")
    for role, ds in built.items():
        notes = "; ".join(ds.label_form_notes)
        print(f"  {role:8s}{ds.describe_form()}" + (f"  [{notes}]" if notes else ""))


def print_cache(cfg, built: dict) -> None:
    """Print the state of each role's cache entries under `data.cache`."""
    if cfg.data.cache is None:
        print("\ncache: off (data.cache = null)")
        return
    print(f"\ncache {cfg.data.cache} (`python -m rtda.datasets prepare --config FILE` writes it):")
    for role, ds in built.items():
        parts = [f"{e.kind} {e.status()}" for e in ds.cache_entries()]
        print(f"  {role:8s}" + ", ".join(parts))


# ------------------------------------------------------------------------------------------------ check
_SCAN: dict = {}


def _scan_init(dataset, images: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _SCAN.update(dataset=dataset, images=images)


def _scan_one(index: int) -> tuple[int, list[str], int]:
    """Decode item `index`'s label (and image, if asked): (index, problems, off-palette pixels)."""
    ds, problems, off = _SCAN["dataset"], [], 0
    if _SCAN["images"]:
        try:
            read_image(ds.images[index], strict=True)
        except DatasetError as exc:
            problems.append(str(exc))
    if ds.labels is not None:
        try:
            _, off = ds.decode_label(index)
        except DatasetError as exc:
            problems.append(str(exc))
    return index, problems, off


def check(built: dict, workers: int, images: bool, progress: bool = True) -> int:
    """The full content scan; prints each bad file on a line and returns how many problems it found."""
    from tqdm import tqdm

    total_problems = 0
    for role, ds in built.items():
        problems = ds.file_problems()
        header_bad = len(problems)
        if ds.labels is None and not images:
            scanned = "no labels to decode (--images decodes the images)"
            off_total, off_files = 0, []
        else:
            indices = range(len(ds))
            bar = tqdm(total=len(ds), unit="file", desc=f"check {role}", disable=not progress, file=sys.stderr,
                       dynamic_ncols=True)
            off_files = []
            if workers > 1 and len(ds) > 1:
                with multiprocessing.get_context().Pool(min(workers, len(ds)), _scan_init, (ds, images)) as pool:
                    results = list(_tick(pool.imap_unordered(_scan_one, indices, chunksize=4), bar))
            else:
                _SCAN.update(dataset=ds, images=images)
                results = list(_tick(map(_scan_one, indices), bar))
            bar.close()
            already = {problem.split(": ", 1)[0] for problem in problems}  # one line per bad file
            for index, found, off in sorted(results):
                problems += [problem for problem in found if problem.split(": ", 1)[0] not in already]
                if off:
                    off_files.append((off, ds.label_path(index)))
            off_total = sum(off for off, _ in off_files)
            scanned = " and ".join((["images"] if images else []) + (["labels"] if ds.labels is not None else []))
            scanned += " decoded"
        cache_bad, cache_note = cache_problems(ds)
        problems += cache_bad
        scanned_cache = len(cache_bad)
        for problem in problems:
            print(f"bad: {problem}")
        line = (f"{role}: {len(ds)} items of {ds.describe_root()}, {ds.describe_form()}; headers of every file "
                f"checked, {scanned}: {len(problems)} bad file{'s' if len(problems) != 1 else ''}")
        if header_bad:
            line += f" ({header_bad} in the headers)"
        if scanned_cache:
            line += f" ({scanned_cache} in the cache)"
        print(line + cache_note)
        if off_files:
            worst = ", ".join(f"{path.name} ({off})" for off, path in sorted(off_files, reverse=True)[:5])
            print(f"{role}: {off_total} label pixels in {len(off_files)} file{'s' if len(off_files) > 1 else ''} have colours outside the Cityscapes "
                  f"palette and read as ignore (255); most in {worst}")
        total_problems += len(problems)
    return total_problems


def cache_problems(ds) -> tuple[list[str], str]:
    """(one line per damaged cache entry or item of `ds`, a note on what was verified): every item of each
    complete entry is read and checked against its crc32 (as fast as the disk reads the entry)."""
    problems, verified = [], []
    for entry in ds.cache_entries():
        if entry.ready():
            bad = entry.bad_items()
            problems += [f"{entry.folder}: item {i} ({entry.files[i]}) fails its checksum: delete the folder and rerun "
                         "`python -m rtda.datasets prepare` (training reads the file instead)" for i in bad]
            verified.append(f"{entry.kind} {len(entry.files) - len(bad)} of {len(entry.files)} items")
        elif entry.damage:
            problems.append(f"{entry.folder}: {entry.damage}: the loaders read the files instead; delete the folder "
                            "and rerun `python -m rtda.datasets prepare`")
    note = f"; cache checksums verified: {', '.join(verified)}" if verified else ""
    return problems, note


def _tick(results, bar):
    for result in results:
        bar.update()
        yield result
