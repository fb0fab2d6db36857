"""`python -m rtda.datasets.synthetic --out DIR [--num-source N ...]`: write a synthetic two-domain tree.

    python -m rtda.datasets.synthetic --out data/synthetic --num-source 600 --num-target 600 --height 256 --width 512

`--out` must be a new or empty folder, or a tree this generator wrote with the same settings (rewritten in place,
e.g. after an interruption): anything else is refused, nothing is overwritten. `--photo-like` adds per-pixel sensor
noise, so the PNGs are as large and as slow to decode as real photographs (what the loader benchmark needs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rtda.config import ConfigError, SyntheticConfig
from rtda.datasets.synthetic.tree import check_out, generate, manifest_of, validate
from rtda.utils.files import os_error_line

DESCRIPTION = ("Synthetic two-domain street scenes: a game-like *source* (GTA5 layout) and a camera-like *target*\n"
               "(Cityscapes layout), so that every data path runs on a machine without the real data sets.")


def main(argv: list[str] | None = None) -> None:
    default = SyntheticConfig()
    # `python -m` of a package names itself __main__.py: keep the usage line it had as a module
    prog = "synthetic.py" if Path(sys.argv[0]).name == "__main__.py" else None
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write GTA5/ and Cityscapes/ into")
    parser.add_argument("--num-source", type=int, default=default.num_source)
    parser.add_argument("--num-target", type=int, default=default.num_target)
    parser.add_argument("--num-val", type=int, default=None, help="default: num-target // 4")
    parser.add_argument("--height", type=int, default=default.height)
    parser.add_argument("--width", type=int, default=default.width)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--photo-like", action="store_true", help="add per-pixel sensor noise: PNGs as large and "
                        "slow to decode as real photos (for benchmark.py --data)")
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(num_source=args.num_source, num_target=args.num_target,
                          num_val=args.num_val if args.num_val is not None else max(1, args.num_target // 4),
                          height=args.height, width=args.width, seed=args.seed)
    try:
        validate(cfg, cli=True)
        check_out(Path(args.out), manifest_of(cfg, args.photo_like))
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        print(generate(args.out, cfg, progress=True, photo=args.photo_like))
    except OSError as exc:  # a full disk, or --out made read-only meanwhile: rerun with the same settings to finish
        sys.exit(f"{parser.prog}: error: {os_error_line(exc)} (rerun with the same settings to finish the tree)")


if __name__ == "__main__":
    main()
