"""Synthetic two-domain street scenes: a game-like *source* (GTA5 layout) and a camera-like *target*
(Cityscapes layout), so that every data path runs on a machine without the real data sets.

    python -m rtda.datasets.synthetic --out data/synthetic --num-source 600 --num-target 600 --height 256 --width 512

writes

    DIR/GTA5/images/00001.png, DIR/GTA5/labels/00001.png                      (labels: palettised label ids)
    DIR/Cityscapes/leftImg8bit/{train,val}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png
    DIR/Cityscapes/gtFine/{train,val}/{city}/{city}_{seq:06d}_000019_gtFine_labelIds.png   (mode 'L' label ids)
    DIR/synthetic.json                                                          (the parameters used)

Cities are named `synthtrain0..2` and `synthval0..2`, never real Cityscapes cities, so a generated name is never
mistaken for a real frame. `--out` must be a new or empty folder, or a tree this generator wrote with the same
settings (rewritten in place, e.g. after an interruption): anything else is refused, nothing is overwritten.
`--photo-like` adds per-pixel sensor noise, so the PNGs are as large and as slow to decode as real photographs
(about 3.3 MB for a 1914x1052 frame): what the loader benchmark (`benchmark.py --data`) needs.

Both domains draw the same kind of scene (a road in perspective to a vanishing point, sidewalks, facades,
vegetation, poles with signs and lights, vehicles, people) from one pinhole camera, so the classes mean the
same thing in both. They differ the way GTA5 and Cityscapes do: the source is bright and flat-shaded, with
saturated colours and hard edges; the target has other colour distributions, surface texture, sun and shadows, haze,
blur, sensor noise, a visible ego-vehicle bonnet, and other layout statistics (camera height and focal
length, horizon, object counts). Labels are Cityscapes label ids taken from `cityscapesscripts`.

A third look, `randomised` (every part's colour drawn anew per image), is never written to a tree: it is what
`benchmark.py --pretrain-synthetic` pretrains the benchmark's backbone on, in memory.

Every image is a pure function of (seed, domain, index): it draws from its own `numpy.random.Generator`.
`render_scene` draws one in memory, `generate` writes a tree, and `ensure_generated` (what the data loaders
call for `name: synthetic`) writes it once, atomically, the first time a root is used.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from cityscapesscripts.helpers.labels import name2label
from PIL import Image, ImageDraw, ImageFilter

from rtda.config import ConfigError, SyntheticConfig

ID = {name: name2label[name].id for name in (
    "ego vehicle", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")}

# The palette of the real GTA5 label PNGs: label id -> Cityscapes colour.
LABEL_PALETTE = [0] * 768
for _label in CITYSCAPES_LABELS:
    if 0 <= _label.id < 256:
        LABEL_PALETTE[3 * _label.id: 3 * _label.id + 3] = _label.color

# clearly synthetic city names (no real Cityscapes city), in the order the old names sorted, so the loaders'
# sorted order of the scenes is unchanged
TRAIN_CITIES = ("synthtrain0", "synthtrain1", "synthtrain2")
VAL_CITIES = ("synthval0", "synthval1", "synthval2")
FRAME = 19  # Cityscapes' annotated frame of each snippet is frame 000019
DOMAIN_CODES = {"source": 0, "target": 1, "val": 2, "randomised": 3}  # randomised: pretraining only, never written
# zlib level 1 with the run-length strategy (zlib's Z_RLE = 3): as small as the default level 6 on these
# images (PNG's row filters leave runs and small residuals) and several times faster to write
PNG_OPTIONS = {"compress_level": 1, "compress_type": 3}
MANIFEST = "synthetic.json"
PARTIAL = "synthetic.partial"  # present while a tree is being written: a tree with it is incomplete
PHOTO_NOISE_STD = 3.5  # --photo-like: sensor noise on the 0-255 scale (a GTA5-sized PNG grows to ~3.3 MB)
# The version of the domains drawn below (docs/results_synthetic.md): bumped whenever SOURCE, TARGET or the
# drawing change, and written into each tree's manifest, so that a tree (and a benchmark's runs) drawn by another
# version is refused instead of silently mixed with this one's (trees written before the number have none).
GENERATOR_VERSION = 4


# ------------------------------------------------------------------------------------------ domains
@dataclass(frozen=True)
class Style:
    """What one domain's camera, street layout and look are drawn from (ranges are uniform [lo, hi])."""

    focal: tuple[float, float]          # focal length as a fraction of the image width
    camera_height: tuple[float, float]  # metres above the road
    horizon: tuple[float, float]        # horizon row as a fraction of the image height
    road_width: tuple[float, float]     # metres
    sidewalk_width: tuple[float, float]
    building_height: tuple[float, float]
    block_kinds: dict[str, float]       # street-side block kind -> probability
    counts: dict[str, float]            # object kind -> mean count per image (Poisson)
    colours: dict[str, tuple[tuple[int, int, int], float]]  # part -> (mean RGB, per-instance std)
    car_paints: tuple[tuple[int, int, int], ...]
    colour_std_image: float             # per-image shift of each part's colour
    saturation: float                   # >1 boosts, <1 washes out
    texture: dict[str, float]           # label name -> relative amplitude of surface texture
    texture_strength: float
    shadows: bool
    sun: tuple[float, float]            # brightness of facades in shade, in sun
    exposure: tuple[float, float]       # per-image light level (time of day, weather)
    white_balance: float                # std of per-image per-channel gain
    haze: tuple[float, float]           # blend towards the sky colour at the horizon row
    blur: tuple[float, float]           # box-blur radius in pixels at 512 px width
    noise: tuple[float, float]          # sensor noise std on the 0-255 scale
    contrast: tuple[float, float]
    ego_vehicle: bool
    randomised: bool = False            # domain randomisation: each part's colour per image uniform in RGB,
                                        # the texture amplitude per image uniform in [0, texture_strength]


# Version 4: the source camera overlaps the target's and its object colours cover the target's, so that what is
# left of the shift is mostly look (a brighter, more saturated game palette, flat shading) and the layout
# statistics, rather than a camera geometry no method here addresses (docs/results_synthetic.md).
SOURCE = Style(
    focal=(0.64, 0.78), camera_height=(1.3, 1.6), horizon=(0.38, 0.48),
    road_width=(9.0, 14.0), sidewalk_width=(2.5, 4.0), building_height=(8.0, 30.0),
    block_kinds={"building": 0.66, "vegetation": 0.20, "wall": 0.0, "fence": 0.0, "open": 0.14},
    counts={"car": 4.0, "truck": 0.6, "bus": 0.35, "train": 0.0, "person": 2.5, "rider": 0.0,
            "bicycle": 0.8, "motorcycle": 0.0, "pole": 7.0, "tree": 1.5},
    colours={
        "sky": ((95, 160, 240), 12), "road": ((92, 88, 104), 8), "lane": ((235, 235, 235), 5),
        "sidewalk": ((180, 150, 160), 14), "building": ((175, 110, 80), 30), "wall": ((200, 190, 120), 20),
        "fence": ((140, 100, 60), 15), "pole": ((110, 110, 120), 12), "light": ((40, 40, 40), 8),
        "sign": ((30, 80, 230), 40), "vegetation": ((55, 150, 40), 18), "trunk": ((100, 70, 30), 10),
        "terrain": ((140, 180, 70), 15), "skin": ((230, 180, 140), 20), "clothes": ((140, 80, 90), 60),
        "rider": ((240, 120, 30), 40), "window": ((55, 75, 110), 12), "tyre": ((25, 25, 25), 4),
        "bus": ((225, 205, 110), 45), "train": ((200, 40, 40), 20), "truck": ((235, 235, 230), 20),
        "bike": ((50, 90, 140), 50), "skyline": ((120, 130, 160), 15),
    },
    car_paints=((220, 30, 30), (30, 60, 220), (240, 240, 240), (20, 20, 20), (250, 200, 0), (40, 180, 60),
                (170, 170, 180)),
    colour_std_image=10.0, saturation=1.6,
    texture={}, texture_strength=0.0, shadows=False, sun=(1.0, 1.0),
    exposure=(1.15, 1.5), white_balance=0.03, haze=(0.0, 0.0), blur=(0.0, 0.0), noise=(0.0, 0.0),
    contrast=(1.0, 1.0), ego_vehicle=False,
)

TARGET = Style(
    focal=(0.68, 0.80), camera_height=(1.2, 1.45), horizon=(0.36, 0.46),
    road_width=(7.0, 11.0), sidewalk_width=(2.0, 4.5), building_height=(10.0, 22.0),
    block_kinds={"building": 0.52, "vegetation": 0.32, "wall": 0.0, "fence": 0.0, "open": 0.16},
    counts={"car": 6.0, "truck": 0.3, "bus": 0.2, "train": 0.0, "person": 3.5, "rider": 0.0,
            "bicycle": 1.2, "motorcycle": 0.0, "pole": 8.0, "tree": 3.0},
    colours={
        "sky": ((150, 180, 225), 20), "road": ((118, 114, 112), 10), "lane": ((200, 200, 195), 10),
        "sidewalk": ((150, 140, 135), 15), "building": ((140, 130, 120), 25), "wall": ((160, 155, 145), 20),
        "fence": ((120, 115, 105), 20), "pole": ((95, 95, 90), 15), "light": ((50, 55, 50), 10),
        "sign": ((70, 90, 160), 50), "vegetation": ((65, 120, 45), 15), "trunk": ((70, 60, 45), 10),
        "terrain": ((130, 150, 80), 15), "skin": ((200, 160, 130), 25), "clothes": ((70, 70, 80), 40),
        "rider": ((80, 80, 90), 35), "window": ((50, 60, 65), 10), "tyre": ((30, 30, 30), 4),
        "bus": ((200, 200, 190), 40), "train": ((210, 210, 200), 20), "truck": ((190, 190, 185), 30),
        "bike": ((60, 60, 65), 25), "ego": ((45, 48, 55), 6), "skyline": ((150, 155, 160), 15),
    },
    car_paints=((140, 140, 145), (40, 40, 45), (200, 200, 205), (70, 80, 100), (120, 30, 30), (90, 90, 80)),
    colour_std_image=10.0, saturation=0.9,
    texture={"road": 1.0, "sidewalk": 1.2, "building": 1.3, "wall": 1.0, "fence": 1.0, "vegetation": 2.2,
             "terrain": 1.8, "sky": 0.25, "car": 0.4, "truck": 0.5, "bus": 0.5, "person": 0.8, "rider": 0.8},
    texture_strength=0.07, shadows=True, sun=(0.65, 0.9),
    exposure=(0.8, 1.15), white_balance=0.04, haze=(0.05, 0.30), blur=(0.5, 1.1), noise=(1.5, 4.0),
    contrast=(0.75, 0.95), ego_vehicle=True,
)

# A third, domain-randomised look for pretraining a backbone (benchmark.py --pretrain-synthetic), as ImageNet weights
# stand in real UDA: never a benchmark domain. Its camera and layout ranges span both domains' and more, every
# part's colour is drawn anew per image, and the finish (texture, shadows, haze, blur, noise, light) spans the
# flat game look to past the target's.
RANDOMISED = Style(
    focal=(0.55, 0.85), camera_height=(1.1, 1.9), horizon=(0.34, 0.50),
    road_width=(7.0, 14.0), sidewalk_width=(2.0, 4.5), building_height=(8.0, 30.0),
    block_kinds={"building": 0.6, "vegetation": 0.25, "wall": 0.0, "fence": 0.0, "open": 0.15},
    counts={"car": 5.0, "truck": 0.5, "bus": 0.3, "train": 0.0, "person": 3.0, "rider": 0.0,
            "bicycle": 1.0, "motorcycle": 0.0, "pole": 7.5, "tree": 2.2},
    colours={part: ((128, 128, 128), 25) for part in {**SOURCE.colours, **TARGET.colours}},
    car_paints=tuple((r, g, b) for r in (20, 128, 235) for g in (20, 128, 235) for b in (20, 128, 235)),
    colour_std_image=0.0, saturation=1.0,
    texture=TARGET.texture, texture_strength=0.09, shadows=True, sun=(0.6, 1.0),
    exposure=(0.8, 1.4), white_balance=0.05, haze=(0.0, 0.35), blur=(0.0, 1.3), noise=(0.0, 5.0),
    contrast=(0.7, 1.0), ego_vehicle=False, randomised=True,
)

STYLES = {"source": SOURCE, "target": TARGET, "randomised": RANDOMISED}


# ------------------------------------------------------------------------------------------ drawing
class Canvas:
    """A label map and an RGB image drawn together, with a pinhole camera over a flat road.

    World coordinates in metres: X to the right, Y up from the road, Z forward from the camera.
    """

    def __init__(self, rng: np.random.Generator, style: Style, height: int, width: int):
        self.rng, self.style, self.h, self.w = rng, style, height, width
        self.focal = rng.uniform(*style.focal) * width
        self.cam_h = rng.uniform(*style.camera_height)
        self.horizon = rng.uniform(*style.horizon) * height
        self.vx = width * rng.uniform(0.40, 0.60)
        self.z_near = self.focal * self.cam_h / (height - self.horizon) * 0.7  # ground below the bottom row
        self.label = Image.new("L", (width, height), ID["sky"])
        self.rgb = Image.new("RGB", (width, height))
        self.shade = Image.new("L", (width, height), 255)  # 255 = lit; multiplied in at the end
        self.draw_label = ImageDraw.Draw(self.label)
        self.draw_rgb = ImageDraw.Draw(self.rgb)
        self.draw_shade = ImageDraw.Draw(self.shade)
        # Each part's colour in this image: the domain's mean, shifted once per image, in this image's light.
        self.light = rng.uniform(*style.exposure) * (1.0 + rng.normal(0, style.white_balance, 3))
        if style.randomised:
            self.base = {part: rng.uniform(0, 255, 3).astype(np.float32) * self.light for part in style.colours}
        else:
            self.base = {part: (np.asarray(mean, np.float32) + rng.normal(0, style.colour_std_image, 3)) * self.light
                         for part, (mean, _) in style.colours.items()}
        self.sun_left = rng.random() < 0.5  # which facades face the sun

    def colour(self, part: str, scale: float = 1.0) -> tuple[int, int, int]:
        """One instance's colour of `part`: the image's colour of it, jittered, scaled (light), saturated."""
        jitter = self.rng.normal(0, self.style.colours[part][1], 3)
        r, g, b = ((self.base[part] + jitter) * scale).tolist()
        grey, sat = (r + g + b) / 3, self.style.saturation  # saturate the palette, not the pixels
        return tuple(min(255, max(0, int(grey + (v - grey) * sat))) for v in (r, g, b))

    def project(self, x, y, z) -> list[tuple[float, float]]:
        """Image points of world points; each coordinate a number or a list (plain Python: 2-8 points)."""
        seqs = [v for v in (x, y, z) if isinstance(v, (list, tuple))]
        n = len(seqs[0]) if seqs else 1
        xs = x if isinstance(x, (list, tuple)) else (x,) * n
        ys = y if isinstance(y, (list, tuple)) else (y,) * n
        zs = z if isinstance(z, (list, tuple)) else (z,) * n
        f, vx, horizon, cam_h = self.focal, self.vx, self.horizon, self.cam_h
        return [(vx + f * xi / zi, horizon + f * (cam_h - yi) / zi)
                for xi, yi, zi in zip(xs, ys, (zi if zi > 0.05 else 0.05 for zi in zs))]

    def polygon(self, points, label: str, colour) -> None:
        if len(points) >= 3:
            self.draw_label.polygon(points, fill=ID[label])
            self.draw_rgb.polygon(points, fill=colour)

    def detail(self, points, colour) -> None:
        """A polygon in the image only, inside a region already labelled (windows, slats, lights)."""
        if len(points) >= 3:
            self.draw_rgb.polygon(points, fill=colour)

    def detail_box(self, x0, x1, y0, y1, z, colour) -> None:
        self.detail(self.project([x0, x1, x1, x0], [y0, y0, y1, y1], z), colour)

    def ellipse(self, box, label: str, colour) -> None:
        x0, y0, x1, y1 = box
        if x1 - x0 >= 0.5 and y1 - y0 >= 0.5:
            self.draw_label.ellipse((x0, y0, x1, y1), fill=ID[label])
            self.draw_rgb.ellipse((x0, y0, x1, y1), fill=colour)

    def box(self, x0, x1, y0, y1, z, label: str, colour) -> None:
        """An upright rectangle facing the camera at depth z."""
        self.polygon(self.project([x0, x1, x1, x0], [y0, y0, y1, y1], z), label, colour)

    def ground_quad(self, x0, x1, z0, z1, label: str, colour) -> None:
        self.polygon(self.project([x0, x1, x1, x0], 0.0, [z0, z0, z1, z1]), label, colour)

    def facade(self, x, z0, z1, height, label: str, colour) -> None:
        """A vertical wall along the street at lateral offset x from depth z0 to z1."""
        self.polygon(self.project([x, x, x, x], [0, height, height, 0], [z0, z0, z1, z1]), label, colour)

    def shadow(self, points, darkness: float) -> None:
        if self.style.shadows and len(points) >= 3:
            self.draw_shade.polygon(points, fill=int(255 * (1 - darkness)))


Z_FAR = 250.0


def _draw_street(c: Canvas, rng: np.random.Generator) -> dict:
    st = c.style
    road = rng.uniform(*st.road_width)
    centre = rng.uniform(-0.25, 0.25) * road  # the camera is not always in the middle of the road
    left, right = centre - road / 2, centre + road / 2
    walk = (rng.uniform(*st.sidewalk_width), rng.uniform(*st.sidewalk_width))
    # Everything below the horizon starts as terrain; the far skyline sits on the horizon.
    c.draw_label.rectangle((0, c.horizon, c.w, c.h), fill=ID["terrain"])
    c.draw_rgb.rectangle((0, c.horizon, c.w, c.h), fill=c.colour("terrain"))
    c.draw_rgb.rectangle((0, 0, c.w, c.horizon), fill=c.colour("sky"))
    c.ground_quad(left, right, c.z_near, Z_FAR, "road", c.colour("road"))
    if rng.random() < 0.7:  # dashed centre line
        dash = rng.uniform(2.0, 4.0)
        for z in np.arange(c.z_near + rng.uniform(0, 2 * dash), 80, 2 * dash):
            c.ground_quad(centre - 0.08, centre + 0.08, z, z + dash, "road", c.colour("lane"))
    c.ground_quad(left - walk[0], left, c.z_near, Z_FAR, "sidewalk", c.colour("sidewalk"))
    c.ground_quad(right, right + walk[1], c.z_near, Z_FAR, "sidewalk", c.colour("sidewalk"))
    return {"left": left, "right": right, "walk": walk, "centre": centre, "road": road}


def _draw_blocks(c: Canvas, rng: np.random.Generator, street: dict) -> None:
    """Buildings, walls, fences, hedges and open ground along both sides, far blocks first."""
    st = c.style
    kinds, probs = list(st.block_kinds), np.array(list(st.block_kinds.values()))
    probs = probs / probs.sum()
    blocks = []
    for sign, edge, walk in ((-1, street["left"], street["walk"][0]), (1, street["right"], street["walk"][1])):
        z = c.z_near * rng.uniform(0.3, 1.0)
        while z < 140:
            length = rng.uniform(8, 35)
            kind = kinds[rng.choice(len(kinds), p=probs)]
            setback = 0.0 if rng.random() < 0.6 else rng.uniform(0.5, 6.0)
            blocks.append((z, sign, edge + sign * (walk + setback), kind, length))
            z += length
    # a row of distant buildings and trees along the horizon
    xs = np.linspace(-0.1 * c.w, 1.1 * c.w, 14)
    for x0, x1 in zip(xs[:-1], xs[1:]):
        top = c.horizon - rng.uniform(0.01, 0.07) * c.h
        kind = "building" if rng.random() < 0.65 else "vegetation"
        part = "skyline" if kind == "building" else "vegetation"
        c.polygon([(x0, c.horizon + 1), (x0, top), (x1, top), (x1, c.horizon + 1)], kind, c.colour(part, 0.9))
    for z0, sign, x, kind, length in sorted(blocks, key=lambda b: -b[0]):
        z1 = z0 + length
        lit = st.sun[1] if (sign < 0) == c.sun_left else st.sun[0]
        if kind == "building":
            height = rng.uniform(*st.building_height)
            colour = c.colour("building")
            c.facade(x, z0, z1, height, "building", tuple(int(v * lit) for v in colour))
            # the block's near end, seen at an angle, in the other light
            end = [(x, 0, z0), (x, height, z0), (x + sign * 30, height, z0), (x + sign * 30, 0, z0)]
            pts = c.project(*zip(*end))
            c.polygon(pts, "building", tuple(int(v * (st.sun[0] + st.sun[1] - lit)) for v in colour))
            _windows(c, rng, x, z0, z1, height, lit)
            if c.style.shadows and lit < 1.0:  # the facade's shadow falls on the sidewalk and road
                reach = rng.uniform(1.0, 3.0)
                c.shadow(c.project([x, x - sign * reach, x - sign * reach, x], 0, [z0, z0, z1, z1]), 0.35)
        elif kind == "vegetation":
            height = rng.uniform(1.5, 7.0)
            c.facade(x, z0, z1, height, "vegetation", c.colour("vegetation", lit))
        elif kind == "wall":
            height = rng.uniform(1.0, 3.0)
            behind = rng.uniform(*st.building_height)
            c.facade(x + sign * 4, z0, z1, behind, "building", c.colour("building", lit))
            c.facade(x, z0, z1, height, "wall", c.colour("wall", lit))
        elif kind == "fence":
            height = rng.uniform(1.2, 2.5)
            _fence(c, rng, x, z0, z1, height, lit)


def _windows(c: Canvas, rng, x, z0, z1, height, lit) -> None:
    """Rows of windows: part of the building label, but they give facades their look."""
    if rng.random() < 0.2 or z0 > 45:
        return
    colour = c.colour("window", lit)
    floors = np.arange(2.5, height - 1.0, 3.2)
    cols = np.arange(z0 + 1.0, z1 - 1.0, rng.uniform(3.0, 4.5))
    for y in floors:
        for z in cols:
            c.detail(c.project([x] * 4, [y, y + 1.4, y + 1.4, y], [z, z, z + 1.2, z + 1.2]), colour)


def _fence(c: Canvas, rng, x, z0, z1, height, lit) -> None:
    colour = c.colour("fence", lit)
    c.facade(x, z0, z1, height, "fence", colour)
    # vertical slats in a darker tone, still fence; what shows between them is also labelled fence in Cityscapes
    dark = tuple(int(v * 0.6) for v in colour)
    for z in np.arange(z0, z1, 0.6 if z0 < 30 else 1.5):
        c.detail(c.project([x] * 4, [0, height, height, 0], [z, z, z + 0.2, z + 0.2]), dark)


# ------------------------------------------------------------------------------------------ objects
def _vehicle(c: Canvas, rng, x, z, kind: str) -> None:
    """A car, truck, bus or train seen from behind."""
    if kind == "car":
        w, h = rng.uniform(1.7, 1.95), rng.uniform(1.35, 1.6)
        paint = np.asarray(c.style.car_paints[rng.integers(len(c.style.car_paints))], np.float32)
        body = tuple(int(v) for v in np.clip((paint + rng.normal(0, 12, 3)) * c.light, 0, 255))
    else:
        w, h = (rng.uniform(2.3, 2.6), rng.uniform(2.8, 3.6)) if kind != "train" else (2.7, 3.8)
        body = c.colour(kind)
    c.shadow(c.project([x - w / 2 - 0.2, x + w / 2 + 0.2, x + w / 2 + 0.2, x - w / 2 - 0.2], 0,
                       [z - 0.3, z - 0.3, z + 4, z + 4]), 0.55)
    tyre = c.colour("tyre")
    for side in (-1, 1):  # wheels
        c.box(x + side * (w / 2 - 0.35), x + side * (w / 2 - 0.05), 0, 0.45, z, kind, tyre)
    if kind == "car":
        c.box(x - w / 2, x + w / 2, 0.25, 0.55 * h, z, kind, body)
        cabin = c.project([x - w / 2 + 0.05, x + w / 2 - 0.05, x + w / 2 - 0.3, x - w / 2 + 0.3],
                          [0.55 * h, 0.55 * h, h, h], z)
        c.polygon(cabin, kind, body)
        c.detail_box(x - w / 2 + 0.3, x + w / 2 - 0.3, 0.6 * h, 0.92 * h, z, c.colour("window"))
        for side in (-1, 1):  # rear lights
            c.detail_box(x + side * (w / 2 - 0.3), x + side * (w / 2 - 0.05), 0.4 * h, 0.5 * h, z, (200, 20, 20))
    elif kind == "truck":
        c.box(x - w / 2, x + w / 2, 0.4, h, z, kind, body)
        c.detail_box(x - w / 2 + 0.1, x + w / 2 - 0.1, 0.45, 0.55, z, c.colour("tyre"))  # bumper
    else:  # bus, train: a tall box with a band of windows
        c.box(x - w / 2, x + w / 2, 0.3, h, z, kind, body)
        c.detail_box(x - w / 2 + 0.15, x + w / 2 - 0.15, 0.55 * h, 0.85 * h, z, c.colour("window"))


def _person(c: Canvas, rng, x, z, label: str = "person", base: float = 0.0) -> None:
    """A standing (or, with base > 0, riding) person seen from the front or back."""
    h = rng.uniform(1.55, 1.9)
    clothes, legs, skin = c.colour("clothes" if label == "person" else "rider"), c.colour("clothes", 0.6), c.colour("skin")
    if base == 0.0:
        stride = rng.uniform(0.0, 0.25)
        for side in (-1, 1):
            c.box(x + side * 0.02, x + side * 0.17 + side * stride, 0, 0.48 * h, z, label, legs)
    c.box(x - 0.22, x + 0.22, base + 0.45 * h, base + 0.82 * h, z, label, clothes)
    for side in (-1, 1):  # arms
        c.box(x + side * 0.22, x + side * 0.3, base + 0.5 * h, base + 0.8 * h, z, label, clothes)
    (u0, v0), (u1, v1) = c.project([x - 0.11, x + 0.11], [base + h, base + 0.82 * h], z)
    c.ellipse((u0, v0, u1, v1), label, skin)
    c.shadow(c.project([x - 0.3, x + 0.3, x + 0.3, x - 0.3], 0, [z - 0.2, z - 0.2, z + 0.9, z + 0.9]), 0.45)


def _two_wheeler(c: Canvas, rng, x, z, kind: str, rider: bool) -> None:
    """A bicycle or motorcycle seen from the side, optionally ridden."""
    length = 1.7 if kind == "bicycle" else 2.0
    r = 0.34 if kind == "bicycle" else 0.32
    colour = c.colour("bike")
    tyre = c.colour("tyre")
    # side view: the bike lies along X at depth z (crossing or parked across the view)
    for cx in (x - length / 2 + r, x + length / 2 - r):
        (u0, v0), (u1, v1) = c.project([cx - r, cx + r], [2 * r, 0], z)
        if u1 - u0 < 0.5:
            continue
        # a bicycle wheel is a ring (its inside shows the background), a motorcycle wheel a disc
        ring = max(1, round((u1 - u0) * 0.2)) if kind == "bicycle" else None
        c.draw_label.ellipse((u0, v0, u1, v1), fill=None if ring else ID[kind], outline=ID[kind], width=ring or 1)
        c.draw_rgb.ellipse((u0, v0, u1, v1), fill=None if ring else tyre, outline=tyre, width=ring or 1)
    if kind == "bicycle":
        frame = c.project([x - length / 2 + r, x, x + length / 2 - r, x + 0.1, x - 0.15],
                          [r, r, r, 2.2 * r, 2.2 * r], z)
        c.draw_label.line(frame + frame[:1], fill=ID[kind], width=max(1, int(0.08 * c.focal / z)))
        c.draw_rgb.line(frame + frame[:1], fill=colour, width=max(1, int(0.08 * c.focal / z)))
    else:
        c.polygon(c.project([x - 0.6, x + 0.7, x + 0.5, x - 0.5], [0.3, 0.35, 0.95, 0.85], z), kind, colour)
    if rider:
        _person(c, rng, x, z - 0.05, "rider", base=0.35 if kind == "bicycle" else 0.45)


def _pole(c: Canvas, rng, x, z, side: int) -> None:
    h = rng.uniform(3.0, 8.0)
    w = rng.uniform(0.3, 0.5)
    c.box(x - w / 2, x + w / 2, 0, h, z, "pole", c.colour("pole"))
    what = rng.random()
    if what < 0.4:  # traffic sign on the pole
        s = rng.uniform(1.0, 1.5)
        y = min(h, rng.uniform(2.0, 3.0)) - 0.1
        colour = c.colour("sign")
        if rng.random() < 0.5:
            c.box(x - s / 2, x + s / 2, y - s, y, z - 0.05, "traffic sign", colour)
        else:
            (u0, v0), (u1, v1) = c.project([x - s / 2, x + s / 2], [y, y - s], z - 0.05)
            c.ellipse((u0, v0, u1, v1), "traffic sign", colour)
    elif what < 0.7:  # traffic light, on the pole or on an arm over the road
        arm = rng.uniform(1.0, 4.0) if rng.random() < 0.5 else 0.0
        y = min(h, rng.uniform(3.0, 5.5))
        lx = x - side * arm
        if arm:
            c.box(min(x, lx), max(x, lx), y - 0.12, y, z, "pole", c.colour("pole"))
        c.box(lx - 0.35, lx + 0.35, y - 1.5, y, z - 0.05, "traffic light", c.colour("light"))
        lamp = ((230, 40, 30), (240, 180, 20), (40, 220, 80))[rng.integers(3)]
        (u0, v0), (u1, v1) = c.project([lx - 0.13, lx + 0.13], [y - 0.2, y - 0.46], z - 0.1)
        c.ellipse((u0, v0, u1, v1), "traffic light", lamp)
    elif what < 0.85:  # street lamp arm
        c.box(min(x, x - side * 1.5), max(x, x - side * 1.5), h - 0.15, h, z, "pole", c.colour("pole"))


def _tree(c: Canvas, rng, x, z) -> None:
    trunk_h, crown = rng.uniform(1.5, 3.5), rng.uniform(1.2, 3.0)
    c.box(x - 0.15, x + 0.15, 0, trunk_h + crown, z, "vegetation", c.colour("trunk"))
    (u0, v0), (u1, v1) = c.project([x - crown, x + crown], [trunk_h + 2.2 * crown, trunk_h], z)
    c.ellipse((u0, v0, u1, v1), "vegetation", c.colour("vegetation", rng.uniform(0.8, 1.1)))
    c.shadow(c.project([x - crown, x + crown, x + crown, x - crown], 0, [z - crown, z - crown, z + crown, z + crown]), 0.4)


def _draw_objects(c: Canvas, rng: np.random.Generator, street: dict) -> None:
    counts = {kind: rng.poisson(mean) for kind, mean in c.style.counts.items()}
    left, right, walk = street["left"], street["right"], street["walk"]
    z_min = c.z_near * 1.4
    lanes = np.arange(left + 1.75, right - 1.0, 3.5)
    items = []  # (depth, draw)

    def on_walk(side):  # a lateral position on the left (-1) or right (+1) sidewalk
        return left - rng.uniform(0.4, walk[0] - 0.3) if side < 0 else right + rng.uniform(0.4, walk[1] - 0.3)

    for kind in ("car", "truck", "bus", "train"):
        for _ in range(counts[kind]):
            # traffic thins out with distance: most vehicles within a few dozen metres
            z = min(z_min + 3 + rng.exponential(20), 80) if kind != "train" else rng.uniform(20, 60)
            x = lanes[rng.integers(len(lanes))] + rng.normal(0, 0.2) if kind != "train" else street["centre"]
            if kind == "car" and rng.random() < 0.35:  # parked at the kerb
                x = (left + 1.0) if rng.random() < 0.5 else (right - 1.0)
            items.append((z, lambda x=x, z=z, kind=kind: _vehicle(c, rng, x, z, kind)))
    for _ in range(counts["person"]):
        side, z = rng.choice((-1, 1)), min(z_min + rng.exponential(15), 45)
        items.append((z, lambda x=on_walk(side), z=z: _person(c, rng, x, z)))
    for kind, n, rider in (("bicycle", counts["bicycle"], False), ("bicycle", counts["rider"], True),
                           ("motorcycle", counts["motorcycle"], rng.random() < 0.6)):
        for _ in range(n):
            side, z = rng.choice((-1, 1)), min(z_min + 1 + rng.exponential(12), 40)
            x = (left + 1.2 if side < 0 else right - 1.2) if rider else on_walk(side)
            items.append((z, lambda x=x, z=z, kind=kind, rider=rider: _two_wheeler(c, rng, x, z, kind, rider)))
    for _ in range(counts["pole"]):
        side, z = rng.choice((-1, 1)), min(z_min + rng.exponential(12), 60)
        x = left - walk[0] + 0.4 if side < 0 else right + walk[1] - 0.4
        items.append((z, lambda x=x, z=z, side=side: _pole(c, rng, x, z, side)))
    for _ in range(counts["tree"]):
        side, z = rng.choice((-1, 1)), rng.uniform(z_min + 2, 70)
        x = left - walk[0] - rng.uniform(-0.5, 1.5) if side < 0 else right + walk[1] + rng.uniform(-0.5, 1.5)
        items.append((z, lambda x=x, z=z: _tree(c, rng, x, z)))
    for _, draw in sorted(items, key=lambda item: -item[0]):
        draw()


def _ego_vehicle(c: Canvas, rng) -> None:
    """Cityscapes' bonnet at the bottom of every frame (label id 1, ignored in training)."""
    top = c.h * rng.uniform(0.90, 0.94)
    xs = np.linspace(0, c.w, 17)
    ys = top + (c.h - top) * 0.6 * ((xs - c.w / 2) / (c.w / 2)) ** 2
    c.polygon(list(zip(xs.tolist(), ys.tolist())) + [(c.w, c.h), (0, c.h)], "ego vehicle", c.colour("ego"))


# ------------------------------------------------------------------------------------------ rendering
def _upsampled_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise with features about `cell` pixels wide, unit-ish std, float32 [H, W]."""
    small = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2)), dtype=np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def _finish(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Turn the flat drawing into the domain's photograph: texture, shadows, haze, contrast, sensor, optics.

    Everything per pixel is folded into one brightness field [H, W] and one haze-and-contrast map per row,
    so the target costs a handful of full-image passes.
    """
    st, h, w = c.style, c.h, c.w
    if not (st.texture_strength or st.shadows or st.haze[1] or st.noise[1] or st.blur[1]):
        return np.asarray(c.rgb)  # the game look: flat colours, hard edges, nothing else
    label = np.asarray(c.label)
    field = np.ones((h, w), np.float32)
    if st.texture_strength > 0:
        amp = np.zeros(256, np.float32)
        strength = st.texture_strength * (rng.random() if st.randomised else 1.0)
        for name, a in st.texture.items():
            amp[ID[name]] = a * strength
        tex = 0.6 * _upsampled_noise(rng, h, w, 4) + 0.4 * _upsampled_noise(rng, h, w, 16)
        field += amp[label] * tex
    if st.shadows:  # cast on the ground only: a nearer facade or car drawn over a shadow stays lit
        on_ground = np.zeros(256, bool)
        on_ground[[ID["road"], ID["sidewalk"], ID["terrain"]]] = True
        shade = np.asarray(c.shade, dtype=np.float32) * np.float32(1.0 / 255.0)
        field *= np.where(on_ground[label], shade, np.float32(1.0))
    # haze: far things fade into the sky colour, most at the horizon row
    rows = np.arange(h, dtype=np.float32)
    fade = (rng.uniform(*st.haze) * np.exp(-np.abs(rows - c.horizon) / (0.12 * h)))[:, None, None]
    contrast = rng.uniform(*st.contrast)
    scale = (1.0 - fade) * contrast  # [H, 1, 1]
    offset = (fade * c.base["sky"] - 128.0) * contrast + 128.0  # [H, 1, 3]
    img = np.asarray(c.rgb, dtype=np.float32)
    img *= field[..., None]
    img *= scale
    img += offset
    if st.noise[1] > 0:
        # uniform noise of the drawn std: three times cheaper to draw than Gaussian, and blurred next anyway
        std = np.float32(rng.uniform(*st.noise) * math.sqrt(12.0))
        img += (rng.random((h, w, 1), dtype=np.float32) - np.float32(0.5)) * std
    out = Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8), mode="RGB")
    if st.blur[1] > 0:
        out = out.filter(ImageFilter.BoxBlur(rng.uniform(*st.blur) * w / 512))
    return np.asarray(out)


def render_scene(domain: str, index: int, seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene of `domain` (`source`, `target` or `val`, which looks like the target): uint8 RGB [H, W, 3]
    and uint8 Cityscapes label ids [H, W]. A pure function of its arguments."""
    if domain not in DOMAIN_CODES:
        raise ValueError(f"domain {domain!r}: expected one of {', '.join(DOMAIN_CODES)}")
    rng = np.random.default_rng([seed, DOMAIN_CODES[domain], index])
    c = Canvas(rng, STYLES.get(domain, TARGET), height, width)
    street = _draw_street(c, rng)
    _draw_blocks(c, rng, street)
    _draw_objects(c, rng, street)
    if c.style.ego_vehicle:
        _ego_vehicle(c, rng)
    return _finish(c, rng), np.asarray(c.label)


# ------------------------------------------------------------------------------------------ writing
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


def _manifest_of(cfg: SyntheticConfig, photo_like: bool = False) -> dict:
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
                f"{wanted.get('generator')} in this code, docs/results_synthetic.md")
    return ", ".join(f"{k}: {found.get(k)!r} on disk, {wanted.get(k)!r} asked for"
                     for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k))


def check_out(out: Path, wanted: dict) -> None:
    """Refuse to write into anything but a new or empty folder or a synthetic tree of the same settings."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, expected a folder (new, empty, or a synthetic tree)")
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


def photo_like(image: np.ndarray, seed: int, domain: str, index: int) -> np.ndarray:
    """`image` with per-pixel Gaussian sensor noise (its own stream: the scene itself is unchanged)."""
    rng = np.random.default_rng([seed, DOMAIN_CODES[domain], index, 1])
    noisy = image.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(PHOTO_NOISE_STD)
    return np.clip(noisy, 0, 255, out=noisy).round().astype(np.uint8)


def generate(out: str | Path, cfg: SyntheticConfig, progress: bool = False, photo: bool = False) -> Path:
    """Write both domains under `out` and return its path.

    `out` must be new, empty, or a tree this generator wrote with the same settings (then rewritten in place);
    anything else is a ConfigError and nothing is written. `photo`: photo-like frames (see `photo_like`)."""
    validate(cfg)
    out = Path(out)
    wanted = _manifest_of(cfg, photo)
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
        if domain == "source":
            image_path = out / "GTA5" / "images" / f"{index + 1:05d}.png"
            label_path = out / "GTA5" / "labels" / f"{index + 1:05d}.png"
        else:
            split = "train" if domain == "target" else "val"
            city, stem = cityscapes_stem(split, index)
            image_path = out / "Cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            label_path = out / "Cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        for folder in (image_path.parent, label_path.parent):
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
        Image.fromarray(image, mode="RGB").save(image_path, **PNG_OPTIONS)
        label_img = Image.fromarray(label, mode="L")
        if domain == "source":  # GTA5 labels are palettised: the pixel values are the ids, the palette colours them
            label_img = label_img.copy()
            label_img.putpalette(LABEL_PALETTE)
        label_img.save(label_path, **PNG_OPTIONS)
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
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or if this process dies
            if not root.exists():
                for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed generator
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
                print(f"generating synthetic domains in {root} ...", file=sys.stderr)
                generate(tmp, cfg, progress=True)
                os.rename(tmp, root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise ConfigError(f"{root}: exists but has no {MANIFEST}; not a synthetic data root "
                          f"(point `root` elsewhere or delete the folder to generate it)")
    if (root / PARTIAL).exists():
        raise ConfigError(f"{root}: an interrupted synthetic generation ({PARTIAL} is there); rerun "
                          f"`python -m rtda.datasets.synthetic --out {root}` with the same settings, or delete the folder")
    wanted, found = _manifest_of(cfg), json.loads(manifest.read_text())
    if found != wanted:
        raise ConfigError(f"{root}: generated with other data.synthetic settings ({_differences(found, wanted)}); "
                          f"delete the folder to regenerate it")
    return root


def main(argv: list[str] | None = None) -> None:
    default = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
        check_out(Path(args.out), _manifest_of(cfg, args.photo_like))
    except ConfigError as exc:
        parser.error(str(exc))
    print(generate(args.out, cfg, progress=True, photo=args.photo_like))


if __name__ == "__main__":
    main()
