"""Look at the data sets of a config: counts, label form per role, cache state, class frequencies; check; prepare.

    python -m rtda.datasets --config configs/gta5_bisenet.yaml [key=value ...] [--max-images 500]
    python -m rtda.datasets --config configs/gta5_bisenet.yaml --check [--images] [--workers N]
    python -m rtda.datasets prepare --config configs/gta5_bisenet.yaml [--workers N] [--roles source,val]

The summary says which label form was detected for each role (and why, when it had to choose). Frequencies
are counted on the stored labels (train ids, original size, no augmentation) with one bincount per label map;
`--max-images N` takes N evenly spaced maps per set.

`--check` scans every file's content: the pre-flight header check of every image and label, then every label
decoded and its values checked against the set's form (and, with `--images`, every image decoded); each bad
file is one line; exit status 1 if any.

`prepare` writes each role's images and train-id labels at the role's size into `data.cache` (datasets/cache.py),
which the loaders then read instead of the PNGs. It shows a progress bar with the rate, runs `--workers`
processes (default: the cores this process may use), can be stopped with Ctrl-C and rerun to continue, and
writes nothing outside `data.cache`.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import warnings

import numpy as np

from rtda.config import ConfigError, load_config
from rtda.datasets import ROLES, DatasetError, GTA5Dataset, build_dataset
from rtda.datasets.io import PYSPNG_HINT, has_pyspng, read_image
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
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive number")
    return value


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def print_forms(built: dict) -> None:
    print("\nlabel form per role (told from the values and modes of the label files; data.<role>.label_form overrides):")
    for role, ds in built.items():
        notes = "; ".join(ds.label_form_notes)
        print(f"  {role:8s}{ds.describe_form()}" + (f"  [{notes}]" if notes else ""))


def print_cache(cfg, built: dict) -> None:
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
        for problem in problems:
            print(f"bad: {problem}")
        line = (f"{role}: {len(ds)} items of {ds.describe_root()}, {ds.describe_form()}; headers of every file "
                f"checked, {scanned}: {len(problems)} bad file{'s' if len(problems) != 1 else ''}")
        if header_bad:
            line += f" ({header_bad} in the headers)"
        print(line)
        if off_files:
            worst = ", ".join(f"{path.name} ({off})" for off, path in sorted(off_files, reverse=True)[:5])
            print(f"{role}: {off_total} label pixels in {len(off_files)} file{'s' if len(off_files) > 1 else ''} have colours outside the Cityscapes "
                  f"palette and read as ignore (255); most in {worst}")
        total_problems += len(problems)
    return total_problems


def _tick(results, bar):
    for result in results:
        bar.update()
        yield result


# ---------------------------------------------------------------------------------------------- prepare
def main_prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtda.datasets prepare",
                                     description="Write each role's images and train-id labels at the config's "
                                                 "size into data.cache, which the loaders then read.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--workers", type=_positive, default=available_cores(),
                        help=f"processes decoding in parallel (default: the {available_cores()} cores available)")
    parser.add_argument("--roles", default=None, help="comma-separated roles to prepare (default: source and val, "
                        "and target unless adapt.name = none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.cache=/ssd/cache")
    args = parser.parse_args(argv)
    from rtda.datasets.cache import PrepareInterrupted, folder_bytes, prepare_dataset, unused_entries

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.cache is None:
            raise ConfigError("data.cache = null (the cache is off): name a folder, e.g. data.cache=data/cache, "
                              "and use the same value when training")
        if args.roles is None:
            roles = [r for r in ROLES if r != "target" or cfg.adapt.name != "none"]
            skipped = [r for r in ROLES if r not in roles]
        else:
            roles = [r.strip() for r in args.roles.split(",") if r.strip()]
            bad = [r for r in roles if r not in ROLES]
            if bad or not roles:
                raise ConfigError(f"--roles {args.roles}: expected a comma-separated subset of {', '.join(ROLES)}")
            skipped = []
        if not has_pyspng():
            print(f"note: {PYSPNG_HINT}", file=sys.stderr)
        used = set()
        for role in roles:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not prepared" is what we are about to fix
                ds = build_dataset(getattr(cfg.data, role), cfg, role)
            entries = ds.cache_entries()
            todo = [e for e in entries if not e.ready()]
            print(f"{role}: {len(ds)} items of {ds.describe_root()}, {ds.describe_form()}; "
                  + ", ".join(f"{e.kind} {'x'.join(map(str, e.item_shape))} ({_gib(e.nbytes)}) {e.status()}"
                              for e in entries), flush=True)
            if todo:
                entries = prepare_dataset(ds, role, args.workers, progress=not args.quiet)
            for entry in entries:
                used.add(entry.folder)
                print(f"  {entry.kind}: {entry.folder} {entry.status()}")
        for role in skipped:
            print(f"{role}: skipped (adapt.name = none reads no target images; --roles source,target,val "
                  "prepares it too)")
        others = unused_entries(cfg.data.cache, used)
        if others:
            size = sum(folder_bytes(p) for p in others)
            print(f"{len(others)} other entries in {cfg.data.cache} ({_gib(size)}) are not read by this config "
                  f"(other files, sizes or label forms); delete them by hand if no config needs them")
    except PrepareInterrupted as exc:
        print(exc, file=sys.stderr)
        return 130
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- summary
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        code = main_prepare(argv[1:])
        if code:
            sys.exit(code)
        return 0
    parser = argparse.ArgumentParser(prog="python -m rtda.datasets", description=__doc__.splitlines()[0],
                                     epilog="python -m rtda.datasets prepare --help: write the cache")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="count class pixels on at most N evenly spaced label maps per set")
    parser.add_argument("--check", action="store_true", help="scan every file's content instead of counting classes")
    parser.add_argument("--images", action="store_true", help="--check: decode every image too (slower)")
    parser.add_argument("--workers", type=_positive, default=available_cores(),
                        help="--check: processes scanning in parallel (default: the cores available)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.val.split=val")
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images {args.max_images}: expected a positive number of images")
    try:
        cfg = load_config(args.config, args.overrides)
        built = {role: build_dataset(getattr(cfg.data, role), cfg, role) for role in ROLES}
        labelled = {role: ds for role, ds in built.items() if ds.labels is not None}
        counts = {}
        if not args.check:
            counts = {role: class_pixel_counts(ds, args.max_images) for role, ds in labelled.items()}
    except (ConfigError, DatasetError) as exc:
        sys.exit(f"error: {exc}")

    if not has_pyspng():
        print(f"note: {PYSPNG_HINT}", file=sys.stderr)
    print(f"{'role':8s}{'data set':12s}{'split':8s}{'images':>8s}  root")
    for role, ds in built.items():
        ds_cfg = getattr(cfg.data, role)
        split = "-" if isinstance(ds, GTA5Dataset) else ds_cfg.split  # GTA5 has no split folders
        print(f"{role:8s}{ds_cfg.name:12s}{split:8s}{len(ds):8d}  {ds_cfg.root}")
    print_forms(built)
    print_cache(cfg, built)
    if args.check:
        print()
        problems = check(built, args.workers, args.images)
        if problems:
            sys.exit(1)
        return 0
    if not counts:
        return 0
    print(f"\nclass pixel frequency (%), over {args.max_images or 'all'} label maps per set")
    print(f"{'class':16s}" + "".join(f"{role:>10s}" for role in counts))
    totals = {role: max(int(c.sum()), 1) for role, c in counts.items()}
    rows = [(name, train_id) for train_id, name in enumerate(CLASS_NAMES)] + [("ignore (255)", IGNORE_INDEX)]
    for name, train_id in rows:
        print(f"{name:16s}" + "".join(f"{100 * c[train_id] / totals[role]:10.2f}" for role, c in counts.items()))
    return 0


if __name__ == "__main__":
    main()
