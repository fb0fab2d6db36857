"""The looks of the synthetic domains: what each domain's camera, street layout and colours are drawn from.

`source` is game-like (GTA5 stand-in): bright, flat-shaded, saturated, hard edges. `target` (and `val`) is
camera-like (Cityscapes stand-in): other colour distributions, surface texture, sun and shadows, haze, blur, sensor
noise, a visible ego-vehicle bonnet and other layout statistics. `randomised` draws every part's colour anew per
image; it is used only to pretrain a benchmark backbone in memory and is never written to a tree.
"""
from __future__ import annotations

from dataclasses import dataclass

from cityscapesscripts.helpers.labels import name2label

ID = {name: name2label[name].id for name in (
    "ego vehicle", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")}

DOMAIN_CODES = {"source": 0, "target": 1, "val": 2, "randomised": 3}  # part of each image's seed: never renumber


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




# The source camera overlaps the target's and its object colours cover the target's, so that the shift is mostly
# look (a brighter, more saturated game palette, flat shading) and layout statistics.
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


# A domain-randomised look for pretraining a backbone (as ImageNet weights stand in real UDA); never a benchmark
# domain. Its camera and layout ranges span both domains' and more, every part's colour is drawn anew per image,
# and the finish (texture, shadows, haze, blur, noise, light) spans the flat game look to past the target's.
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
