"""Look at the data sets of a config: counts, label form per role, cache state, class frequencies; check; prepare.

    python -m rtda.datasets --config configs/gta5_bisenet.yaml [key=value ...] [--max-images 500]
    python -m rtda.datasets --config configs/gta5_bisenet.yaml --check [--images] [--workers N]
    python -m rtda.datasets prepare --config configs/gta5_bisenet.yaml [--workers N] [--roles source,val]

The summary says which label form was detected for each role (and why, when it had to choose). Frequencies
are counted on the stored labels (train ids, original size, no augmentation) with one bincount per label map;
`--max-images N` takes N evenly spaced maps per set.

`--check` scans every file's content: the pre-flight header check of every image and label, then every label
decoded and its values checked against the set's form (and, with `--images`, every image decoded), then every
item of the set's prepared cache entries read and checked against its crc32 (datasets/cache.py); each bad file,
entry or cached item is one line; exit status 1 if any.

`prepare` writes each role's images and train-id labels at the role's size into `data.cache` (datasets/cache.py),
which the loaders then read instead of the PNGs. It shows a progress bar with the rate, runs `--workers`
processes (default: the cores this process may use), can be stopped with Ctrl-C and rerun to continue, and
writes nothing outside `data.cache`.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from rtda.config import ConfigError, load_config
from rtda.datasets import ROLES, DatasetError, build_dataset
from rtda.datasets.inspect import (
    available_cores,
    check,
    class_pixel_counts,
    gib,
    positive,
    print_cache,
    print_class_frequencies,
    print_forms,
    print_roles,
)
from rtda.datasets.io import PYSPNG_HINT, has_pyspng
from rtda.utils.files import os_error_line


# ---------------------------------------------------------------------------------------------- prepare
def _roles(text: str | None, cfg) -> tuple[list[str], list[str]]:
    """(roles to prepare, roles skipped by default) from `--roles` (None: source and val, and target unless
    adapt.name = none)."""
    if text is None:
        roles = [r for r in ROLES if r != "target" or cfg.adapt.name != "none"]
        return roles, [r for r in ROLES if r not in roles]
    roles = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ConfigError(f"--roles {text}: expected a comma-separated subset of {', '.join(ROLES)}")
    return roles, []


def _prepare_role(cfg, role: str, workers: int, progress: bool) -> set:
    """Prepare the missing cache entries of one role, printing its state before and after; the folders it reads."""
    from rtda.datasets.cache import prepare_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not prepared" is what we are about to fix
        ds = build_dataset(getattr(cfg.data, role), cfg, role)
    entries = ds.cache_entries()
    todo = [e for e in entries if not e.ready()]
    print(f"{role}: {len(ds)} items of {ds.describe_root()}, {ds.describe_form()}; "
          + ", ".join(f"{e.kind} {'x'.join(map(str, e.item_shape))} ({gib(e.nbytes)}) {e.status()}"
                      for e in entries), flush=True)
    if todo:
        entries = prepare_dataset(ds, role, workers, progress=progress)
    for entry in entries:
        print(f"  {entry.kind}: {entry.folder} {entry.status()}")
    return {entry.folder for entry in entries}


def _report_unused(cache, used: set) -> None:
    from rtda.datasets.cache import folder_bytes, unused_entries

    others = unused_entries(cache, used)
    if others:
        size = sum(folder_bytes(p) for p in others)
        print(f"{len(others)} other entries in {cache} ({gib(size)}) are not read by this config "
              f"(other files, sizes or label forms); delete them by hand if no config needs them")


def main_prepare(argv: list[str]) -> int:
    """`python -m rtda.datasets prepare ...`: write the cache; the exit status (0, 1 on errors, 130 stopped)."""
    parser = argparse.ArgumentParser(prog="python -m rtda.datasets prepare",
                                     description="Write each role's images and train-id labels at the config's "
                                                 "size into data.cache, which the loaders then read.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--workers", type=positive, default=available_cores(),
                        help=f"processes decoding in parallel (default: the {available_cores()} cores available)")
    parser.add_argument("--roles", default=None, help="comma-separated roles to prepare (default: source and val, "
                        "and target unless adapt.name = none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.cache=/ssd/cache")
    args = parser.parse_args(argv)
    from rtda.datasets.cache import PrepareInterrupted

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.cache is None:
            raise ConfigError("data.cache = null (the cache is off): name a folder, e.g. data.cache=data/cache, "
                              "and use the same value when training")
        roles, skipped = _roles(args.roles, cfg)
        if not has_pyspng():
            print(f"note: {PYSPNG_HINT}", file=sys.stderr)
        used = set()
        for role in roles:
            used |= _prepare_role(cfg, role, args.workers, progress=not args.quiet)
        for role in skipped:
            print(f"{role}: skipped (adapt.name = none reads no target images; --roles source,target,val "
                  "prepares it too)")
        _report_unused(cfg.data.cache, used)
    except PrepareInterrupted as exc:
        print(exc, file=sys.stderr)
        return 130
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, or a cache folder that is a file, under a file or read-only
        print(f"error: {os_error_line(exc)} (complete cache entries are kept; the next prepare carries on with the "
              "rest)", file=sys.stderr)
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
    parser.add_argument("--check", action="store_true", help="scan every file's content (and verify every cached item's checksum) instead of counting classes")
    parser.add_argument("--images", action="store_true", help="--check: decode every image too (slower)")
    parser.add_argument("--workers", type=positive, default=available_cores(),
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
    print_roles(cfg, built)
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
    print_class_frequencies(counts, args.max_images)
    return 0


if __name__ == "__main__":
    main()
