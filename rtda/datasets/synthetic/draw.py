"""The drawing engine: a label map and an RGB image drawn together by a pinhole camera over a flat road.

`draw_scene(canvas, rng)` draws one street scene (road, street-side blocks, objects far to near, the ego-vehicle
when the style has one). Every random draw comes from `rng`, in a fixed order: the same generator state gives the
same scene, pixel for pixel.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from rtda.datasets.synthetic.styles import ID, Style


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



def draw_scene(c: Canvas, rng: np.random.Generator) -> None:
    """Draw the whole scene onto `c`: street, blocks, objects, then the ego-vehicle if the style has one."""
    street = _draw_street(c, rng)
    _draw_blocks(c, rng, street)
    _draw_objects(c, rng, street)
    if c.style.ego_vehicle:
        _ego_vehicle(c, rng)
