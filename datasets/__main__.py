"""Summarise the data sets of a config: image counts per role and class pixel frequencies.

    python -m datasets --config configs/gta5_bisenet.yaml [key=value ...] [--max-images 500]

Frequencies are counted on the stored labels (train ids, original size, no augmentation) with one bincount
per label map; `--max-images N` takes N evenly spaced maps per set.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from config import ConfigError, load_config
from datasets import ROLES, DatasetError, GTA5Dataset, build_dataset
from datasets.labels import CLASS_NAMES, IGNORE_INDEX


def class_pixel_counts(dataset, max_images: int | None = None) -> np.ndarray:
    """int64 [256] pixel counts per train id over (an evenly spaced subset of) the data set's label maps."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int) if count else []
    counts = np.zeros(256, dtype=np.int64)
    for index in indices:
        counts += np.bincount(dataset.read_train_ids(int(index)).ravel(), minlength=256)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datasets", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="count class pixels on at most N evenly spaced label maps per set")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.val.split=val")
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images {args.max_images}: expected a positive number of images")
    try:
        cfg = load_config(args.config, args.overrides)
        built = {role: build_dataset(getattr(cfg.data, role), cfg, role) for role in ROLES}
        labelled = {role: ds for role, ds in built.items() if ds.labels is not None}
        counts = {role: class_pixel_counts(ds, args.max_images) for role, ds in labelled.items()}
    except (ConfigError, DatasetError) as exc:
        sys.exit(f"error: {exc}")

    print(f"{'role':8s}{'data set':12s}{'split':8s}{'images':>8s}  root")
    for role, ds in built.items():
        ds_cfg = getattr(cfg.data, role)
        split = "-" if isinstance(ds, GTA5Dataset) else ds_cfg.split  # GTA5 has no split folders
        print(f"{role:8s}{ds_cfg.name:12s}{split:8s}{len(ds):8d}  {ds_cfg.root}")
    if not counts:
        return
    print(f"\nclass pixel frequency (%), over {args.max_images or 'all'} label maps per set")
    print(f"{'class':16s}" + "".join(f"{role:>10s}" for role in counts))
    totals = {role: max(int(c.sum()), 1) for role, c in counts.items()}
    rows = [(name, train_id) for train_id, name in enumerate(CLASS_NAMES)] + [("ignore (255)", IGNORE_INDEX)]
    for name, train_id in rows:
        print(f"{name:16s}" + "".join(f"{100 * c[train_id] / totals[role]:10.2f}" for role, c in counts.items()))


if __name__ == "__main__":
    main()
