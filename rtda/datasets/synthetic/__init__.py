"""Synthetic two-domain street scenes: a game-like *source* (GTA5 layout) and a camera-like *target*
(Cityscapes layout), so that every data path runs on a machine without the real data sets.

Both domains draw the same kind of scene from one pinhole camera, so the classes mean the same thing in both;
labels are Cityscapes label ids. Cities are named `synthtrain0..2` and `synthval0..2`, never real Cityscapes
cities. Every image is a pure function of (seed, domain, index).

- `styles`: what each domain is drawn from (`Style`, `SOURCE`, `TARGET`, `RANDOMISED`);
- `draw`: the drawing engine (`Canvas`, `draw_scene`);
- `render`: `render_scene` (one scene in memory), `photo_like`;
- `tree`: `generate` (write a tree), `ensure_generated` (write one once, atomically), the manifest checks;
- `__main__`: `python -m rtda.datasets.synthetic --out DIR ...`.
"""
from rtda.datasets.synthetic.render import photo_like, render_scene
from rtda.datasets.synthetic.styles import DOMAIN_CODES, ID, RANDOMISED, SOURCE, STYLES, TARGET, Style
from rtda.datasets.synthetic.tree import (
    FRAME,
    GENERATOR_VERSION,
    LABEL_PALETTE,
    MANIFEST,
    PARTIAL,
    TRAIN_CITIES,
    VAL_CITIES,
    check_out,
    cityscapes_stem,
    ensure_generated,
    generate,
    validate,
    version_name,
)


def main(argv: list[str] | None = None) -> None:
    """`python -m rtda.datasets.synthetic` with `argv`; imported on call so that `-m` finds no stale module."""
    from rtda.datasets.synthetic.__main__ import main as run

    run(argv)


__all__ = ["DOMAIN_CODES", "FRAME", "GENERATOR_VERSION", "ID", "LABEL_PALETTE", "MANIFEST", "PARTIAL", "RANDOMISED",
           "SOURCE", "STYLES", "Style", "TARGET", "TRAIN_CITIES", "VAL_CITIES", "check_out", "cityscapes_stem",
           "ensure_generated", "generate", "main", "photo_like", "render_scene", "validate", "version_name"]
