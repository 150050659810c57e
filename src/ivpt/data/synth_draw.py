"""The picture side of the synthetic part-world (:mod:`ivpt.data.synth`): the parts and their colours, shape
helpers, the pose, the bird drawing, the backgrounds and the textured worlds' scenery and nuisances.

:mod:`ivpt.data.synth` picks a class's attributes and a difficulty, calls these to draw one sample (in a fixed order
of random draws, see :func:`ivpt.data.synth.render_sample`) and writes the dataset.
"""
from __future__ import annotations

import colorsys
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

PART_NAMES = ("head", "beak", "body", "wing", "tail", "legs")  # part id = position + 1 (0 is background)
HEAD, BEAK, BODY, WING, TAIL, LEGS = range(1, 7)

HEAD_HUES = {"red": 0.0, "yellow": 55.0, "green": 120.0, "cyan": 185.0, "blue": 230.0, "magenta": 300.0}
BODY_COLOURS = {"brown": (140, 92, 48), "grey": (128, 130, 134), "cream": (226, 212, 172), "black": (42, 42, 48)}
WING_PATTERNS = ("solid", "striped", "dotted", "checkered")
TAIL_SHAPES = ("fan", "forked", "pointed", "square")


class _Nuisances(NamedTuple):
    """How far a textured world's nuisances go (``medium`` and ``hard``; ``standard`` has its own drawing)."""

    rotation: float  # pose rotation within +-rotation degrees
    scale: tuple[float, float]  # pixels per object unit, as fractions of the image side
    distractors: tuple[int, int]  # background shapes in part colours: integers(low, high)
    branch_p: float  # probability of branches in front of the bird ...
    branches: tuple[int, int]  # ... and how many: integers(low, high)
    leaves_p: float  # probability of a leaf cluster in front of the bird
    cast: float  # colour cast: each channel's gain within 1 +- cast
    blur_p: float  # probability of a mild blur of the whole image
    noise: tuple[float, float]  # Gaussian pixel noise, std within (low, high) grey levels


_WING_BASES = ((200, 70, 60), (70, 110, 190), (80, 150, 90), (210, 170, 60), (150, 90, 170), (110, 110, 110))
_OBJECT_CENTRE = np.array([0.0, 0.06])  # middle of the creature's extent, in object units
_HARD_MARGIN = 0.45  # object units kept between a hard pose's centre and the frame's edges


# ---------------------------------------------------------------------------------------------------- geometry


def _ellipse(cx: float, cy: float, a: float, b: float, tilt: float = 0.0, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    u, v = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([cx + c * u - s * v, cy + s * u + c * v], axis=1)


def _rotate(points: np.ndarray, angle: float, pivot: Sequence[float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = points - pivot
    return np.stack([pivot[0] + c * d[:, 0] - s * d[:, 1], pivot[1] + s * d[:, 0] + c * d[:, 1]], axis=1)


class _Pose:
    """Object units -> pixel-centre coordinates: optional mirror, rotation, scale, translation.

    ``hard`` draws a wider pose: rotation within +-60 degrees, 0.28..0.62 pixels-per-unit of ``size`` (the standard
    range is 0.40..0.60) and a centre anywhere the bird still lies mostly inside the frame.
    """

    def __init__(self, rng: np.random.Generator, size: int, nuisances: _Nuisances | None = None) -> None:
        self.mirror = rng.random() < 0.5
        wide = nuisances is not None
        self.angle = math.radians(rng.uniform(-nuisances.rotation, nuisances.rotation) if wide
                                  else rng.uniform(-35, 35))
        # pixels per object unit; the bird spans ~1.3 units
        self.scale = rng.uniform(*nuisances.scale) * size if wide else rng.uniform(0.40, 0.60) * size
        self.centre = self._hard_centre(rng, size) if wide else self._standard_centre(rng, size)

    @staticmethod
    def _standard_centre(rng: np.random.Generator, size: int) -> np.ndarray:
        if rng.random() < 0.12:  # now and then the bird leans out of the frame
            direction = rng.uniform(0, 2 * np.pi)
            offset = rng.uniform(0.28, 0.42) * size * np.array([math.cos(direction), math.sin(direction)])
        else:
            offset = rng.uniform(-0.14, 0.14, size=2) * size
        return (size - 1) / 2 + offset

    def _hard_centre(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Anywhere at least ``_HARD_MARGIN`` object units from every edge: the bird reaches ~0.75 units from its
        centre, so at most roughly a quarter of it leaves the frame."""
        margin = min(_HARD_MARGIN * self.scale, (size - 1) / 2)
        return rng.uniform(margin, size - 1 - margin, size=2)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64) - _OBJECT_CENTRE
        if self.mirror:
            p = p * np.array([-1.0, 1.0])
        return _rotate(p, self.angle, (0.0, 0.0)) * self.scale + self.centre


def _flat(points: np.ndarray) -> list[float]:
    return points.ravel().tolist()


def _jitter_rgb(rgb: Sequence[int], rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _hsv(hue_deg: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360) / 360, sat, val)
    return int(255 * r), int(255 * g), int(255 * b)


# ---------------------------------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth gradient or low-frequency noise, plus blurred clutter blobs that never look like parts. Drawn at half
    resolution and upsampled: the scene behind the bird is soft anyway, and it halves the cost."""
    small = max(8, size // 2)
    if rng.random() < 0.5:
        c0, c1 = rng.uniform(40, 220, size=(2, 3))
        theta = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(0, 1, small, dtype=np.float32)
        t = np.clip(0.5 + (ramp[None, :] - 0.5) * math.cos(theta) + (ramp[:, None] - 0.5) * math.sin(theta), 0, 1)
        image = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8), "RGB")
    else:
        cells = int(rng.integers(3, 8))
        grey = rng.uniform(60, 195, size=(cells, cells, 1))
        coarse = np.clip(grey + rng.uniform(-45, 45, size=(cells, cells, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(coarse, "RGB").resize((small, small), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        centre = rng.uniform(0, small, size=2)
        radius = rng.uniform(0.04, 0.18) * small
        k = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
        radii = radius * rng.uniform(0.5, 1.0, size=k)
        blob = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        grey_level = rng.uniform(60, 200)
        tint = rng.uniform(-25, 25, size=3)  # muted: close to grey, unlike the saturated parts
        draw.polygon(_flat(blob), fill=tuple(int(v) for v in np.clip(grey_level + tint, 0, 255)))
    blurred = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.0)) * small / 112))
    return blurred.resize((size, size), Image.BILINEAR)


class _Canvas:
    """Draws each shape twice: in colour on the image and as its part id on the label mask (later shapes win)."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.mask = Image.new("L", image.size, 0)
        self.draw = ImageDraw.Draw(image)
        self.draw_mask = ImageDraw.Draw(self.mask)

    def polygon(self, points: np.ndarray, colour, part: int) -> None:
        self.draw.polygon(_flat(points), fill=colour)
        self.draw_mask.polygon(_flat(points), fill=part)

    def disc(self, centre: np.ndarray, radius: float, colour, part: int) -> None:
        box = [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius]
        self.draw.ellipse(box, fill=colour)
        self.draw_mask.ellipse(box, fill=part)


def _wing_texture(pattern: str, centre: np.ndarray, a: float, b: float, tilt: float) -> list[np.ndarray]:
    """Polygons of the pattern in object units, laid out in the wing's own frame so they turn with it."""
    shapes: list[np.ndarray] = []
    period = 2 * a / 5
    if pattern == "striped":
        for u in np.arange(-a, a, period):
            shapes.append(np.array([[u, -b], [u + period / 2, -b], [u + period / 2, b], [u, b]]))
    elif pattern == "dotted":
        for u, v in itertools.product(np.arange(-a + period / 2, a, period), (-b / 2, b / 2)):
            shapes.append(_ellipse(u, v, period * 0.24, period * 0.24, n=10))
    elif pattern == "checkered":
        cell = period / 1.4
        for i, u in enumerate(np.arange(-a, a, cell)):
            for j, v in enumerate(np.arange(-b, b, cell)):
                if (i + j) % 2 == 0:
                    shapes.append(np.array([[u, v], [u + cell, v], [u + cell, v + cell], [u, v + cell]]))
    return [_rotate(s, tilt, (0.0, 0.0)) + centre for s in shapes]


def _tail_polygon(shape: str, base: float, length: float) -> np.ndarray:
    """Tail pointing to -x from the body's rear at x = ``base``."""
    if shape == "fan":
        angles = np.radians(np.linspace(145, 215, 9))
        arc = np.stack([base + 0.02 + length * np.cos(angles), length * np.sin(angles)], axis=1)
        return np.vstack([[base + 0.02, 0.0], arc])
    if shape == "forked":
        return np.array([[base, -0.06], [base - length, -0.17], [base - 0.6 * length, 0.0],
                         [base - length, 0.17], [base, 0.06]])
    if shape == "pointed":
        return np.array([[base, -0.07], [base - 1.25 * length, 0.0], [base, 0.07]])
    return np.array([[base, -0.1], [base - 0.85 * length, -0.1], [base - 0.85 * length, 0.1], [base, 0.1]])


def _draw_bird(canvas: _Canvas, rng: np.random.Generator, attributes: Sequence[int], pose: _Pose) -> np.ndarray:
    """Draw the parts back to front (legs, tail, body, wing, head, beak); return the (P, 2) part anchors in
    pixels, in part-id order."""
    head_i, body_i, wing_i, tail_i = attributes
    body_rgb = _jitter_rgb(list(BODY_COLOURS.values())[body_i], rng, 14)
    body_a, body_b = 0.32 * rng.uniform(0.92, 1.08), 0.2 * rng.uniform(0.9, 1.1)
    anchors = np.zeros((len(PART_NAMES), 2))
    anchors[LEGS - 1] = _draw_legs(canvas, rng, pose)
    anchors[TAIL - 1] = _draw_tail(canvas, rng, pose, TAIL_SHAPES[tail_i], -body_a + 0.05, body_rgb)
    canvas.polygon(pose(_ellipse(0.0, 0.0, body_a, body_b)), body_rgb, BODY)
    belly = _jitter_rgb([min(255, 0.5 * c + 110) for c in body_rgb], rng, 8)
    canvas.polygon(pose(_ellipse(0.05, 0.5 * body_b, 0.6 * body_a, 0.4 * body_b)), belly, BODY)
    anchors[BODY - 1] = (0.02, 0.42 * body_b)  # low on the body, clear of the wing
    anchors[WING - 1] = _draw_wing(canvas, rng, WING_PATTERNS[wing_i], pose)
    anchors[HEAD - 1], anchors[BEAK - 1] = _draw_head(canvas, rng, pose, list(HEAD_HUES.values())[head_i])
    return pose(anchors)


def _draw_legs(canvas: _Canvas, rng: np.random.Generator, pose: _Pose) -> np.ndarray:
    rgb = _jitter_rgb((190, 120, 50) if rng.random() < 0.5 else (90, 85, 80), rng, 20)
    length = 0.32 * rng.uniform(0.9, 1.1)
    width = max(0.03, 2.2 / pose.scale)  # at least ~2 px wide, so small images keep their legs
    half = np.array([width / 2, 0.0])
    foot = np.array([[-0.02, -width / 2], [0.09, -width / 2], [0.09, width / 2], [-0.02, width / 2]])
    for x in (0.06, -0.07):
        top, bottom = np.array([x, 0.1]), np.array([x + 0.02, 0.12 + length])
        canvas.polygon(pose(np.array([top - half, top + half, bottom + half, bottom - half])), rgb, LEGS)
        canvas.polygon(pose(bottom + foot), rgb, LEGS)
    return np.array([0.07, 0.12 + 0.7 * length])  # on the front leg, below the body


def _draw_tail(canvas: _Canvas, rng: np.random.Generator, pose: _Pose, shape: str, base: float,
               body_rgb: Sequence[int]) -> np.ndarray:
    length, tilt = 0.3 * rng.uniform(0.85, 1.15), math.radians(rng.uniform(-15, 15))
    tail = _rotate(_tail_polygon(shape, base, length), tilt, (base, 0.0))
    canvas.polygon(pose(tail), _jitter_rgb([0.8 * c for c in body_rgb], rng, 10), TAIL)
    return _rotate(np.array([[base - 0.11, 0.0]]), tilt, (base, 0.0))[0]  # behind the body, before any notch


def _draw_head(canvas: _Canvas, rng: np.random.Generator, pose: _Pose, hue: float) -> tuple[np.ndarray, np.ndarray]:
    """Head disc with an eye, then the beak on top; returns (head anchor, beak anchor) in object units."""
    rgb = _hsv(hue + rng.uniform(-8, 8), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    radius = 0.14 * rng.uniform(0.88, 1.12)
    head = np.array([0.38, -0.2]) + rng.uniform(-0.02, 0.02, size=2)
    canvas.disc(pose(head[None])[0], radius * pose.scale, rgb, HEAD)
    eye = pose((head + np.array([0.35, -0.25]) * radius)[None])[0]
    canvas.disc(eye, max(0.22 * radius * pose.scale, 1.0), (15, 15, 20), HEAD)  # off the head anchor
    length = 0.14 * rng.uniform(0.8, 1.2)
    beak = head + np.array([[0.8 * radius, -0.045], [0.8 * radius, 0.045], [radius + length, 0.01]])
    beak_rgb = _jitter_rgb((235, 160, 40) if rng.random() < 0.6 else (70, 70, 70), rng, 15)
    canvas.polygon(pose(beak), beak_rgb, BEAK)
    return head, (beak[0] + beak[1] + 2 * beak[2]) / 4  # inside the triangle, clear of the head disc


def _draw_wing(canvas: _Canvas, rng: np.random.Generator, pattern: str, pose: _Pose) -> np.ndarray:
    """Wing outline in a random base colour with its pattern on top; returns the anchor (the wing's centre)."""
    centre, tilt = np.array([-0.08, -0.08]), math.radians(-12 + rng.uniform(-6, 6))
    a, b = 0.24 * rng.uniform(0.92, 1.08), 0.095
    outline = pose(_ellipse(centre[0], centre[1], a, b, tilt))
    base_rgb = _jitter_rgb(_WING_BASES[int(rng.integers(len(_WING_BASES)))], rng, 15)
    canvas.polygon(outline, base_rgb, WING)
    shapes = _wing_texture(pattern, centre, a, b, tilt)
    if not shapes:
        return centre
    _paste_pattern(canvas.image, [pose(shape) for shape in shapes], outline, _pattern_ink(base_rgb, rng))
    return centre


def _pattern_ink(base_rgb: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int]:
    """Dark ink on a light base, light ink on a dark one."""
    light = sum(base_rgb) > 3 * 128
    return _jitter_rgb((30, 30, 35) if light else (240, 240, 230), rng, 10)


def _paste_pattern(image: Image.Image, shapes: Sequence[np.ndarray], outline: np.ndarray, ink) -> None:
    """Paint ``ink`` where the pixel polygons ``shapes`` overlap the polygon ``outline``. The pattern is drawn on
    its own layer and cut out by the outline (PIL cannot clip a polygon)."""
    texture = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(texture)
    for shape in shapes:
        draw.polygon(_flat(shape), fill=255)
    inside = Image.new("L", image.size, 0)
    ImageDraw.Draw(inside).polygon(_flat(outline), fill=255)
    image.paste(ink, mask=ImageChops.multiply(texture, inside))


def _draw_branch(canvas: _Canvas, rng: np.random.Generator, size: int,
                 half_width: tuple[float, float] = (0.02, 0.04)) -> None:
    """A bar across the frame in front of the bird, ``half_width`` (a range, in units of ``size``) thick on each
    side of its axis: it hides whatever it covers (mask 0)."""
    angle = rng.uniform(0, np.pi)
    through = rng.uniform(0.3, 0.7, size=2) * size
    direction = np.array([math.cos(angle), math.sin(angle)]) * size * 1.5
    normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction)
    half = rng.uniform(*half_width) * size
    bar = np.array([through - direction - half * normal, through + direction - half * normal,
                    through + direction + half * normal, through - direction + half * normal])
    canvas.polygon(bar, _jitter_rgb((105, 80, 60), rng, 25), 0)


# ---------------------------------------------------------------------------------------------------- hard worlds

# Natural colour ramps for hard backgrounds, dark to light: foliage, bark / soil, sky with clouds, dry grass / sand,
# stone.
_PALETTES = (
    ((30, 56, 22), (58, 100, 38), (110, 146, 58), (168, 180, 92)),
    ((44, 32, 22), (88, 62, 42), (136, 106, 78), (176, 158, 128)),
    ((66, 116, 186), (116, 160, 212), (186, 212, 234), (238, 242, 248)),
    ((112, 94, 64), (166, 146, 106), (204, 188, 148), (230, 220, 188)),
    ((56, 58, 56), (98, 102, 98), (148, 148, 142), (198, 196, 188)),
)
_LEAF_GREENS = ((46, 92, 34), (74, 124, 44), (104, 140, 52), (60, 84, 40))


def _normalise(values: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1] (a constant array becomes 0.5)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.full_like(values, 0.5)


def _fractal_noise(rng: np.random.Generator, size: int, cells: int, octaves: int,
                   persistence: float = 0.55) -> np.ndarray:
    """Multi-octave value noise, (size, size) float32 in [0, 1]: random grids of ``cells``, ``2 * cells``, ... cells
    a side, upsampled bicubically and summed with weights ``persistence ** octave``."""
    total = np.zeros((size, size), dtype=np.float32)
    for octave in range(octaves):
        n = min(size, cells * 2 ** octave)
        grid = Image.fromarray(rng.random((n, n), dtype=np.float32), "F")
        total += persistence ** octave * np.asarray(grid.resize((size, size), Image.BICUBIC))
    return _normalise(total)


def _oriented_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bark- or grass-like grain in [0, 1]: a sine across a random direction whose phase is warped by noise, with
    fine noise on top."""
    theta, cycles = rng.uniform(0, np.pi), rng.uniform(4, 18)
    ramp = np.arange(size, dtype=np.float32) / size
    across = ramp[None, :] * math.cos(theta) + ramp[:, None] * math.sin(theta)
    warp = _fractal_noise(rng, size, 2, 3) * rng.uniform(0.5, 3.0)
    grain = (0.5 + 0.5 * np.sin(2 * np.pi * (cycles * across + warp))) ** rng.uniform(0.5, 2.0)
    return _normalise(0.75 * grain + 0.25 * _fractal_noise(rng, size, max(2, size // 16), 2))


def _colourise(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map [0, 1] values through a random natural palette (jittered): (H, W, 3) float32."""
    palette = np.array(_PALETTES[int(rng.integers(len(_PALETTES)))], dtype=np.float32)
    palette = np.clip(palette + rng.uniform(-18, 18, size=palette.shape), 0, 255)
    stops = np.linspace(0, 1, len(palette))
    return np.stack([np.interp(values, stops, palette[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def _texture_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """One textured layer: fractal noise (foliage, clouds, soil) or oriented grain (bark, stripes), coloured."""
    if rng.random() < 0.6:
        values = _fractal_noise(rng, size, int(rng.integers(2, 6)), int(rng.integers(3, 6)))
    else:
        values = _oriented_texture(rng, size)
    return _colourise(values, rng)


def _layer_alpha(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft-edged irregular regions (thresholded noise), (H, W, 1) float32 in [0, 1]."""
    values = _fractal_noise(rng, size, int(rng.integers(2, 5)), 3)
    edge = rng.uniform(0.03, 0.12)
    return np.clip((values - rng.uniform(0.35, 0.65)) / edge + 0.5, 0, 1)[..., None]


def _hard_background(rng: np.random.Generator, size: int, nuisances: _Nuisances) -> Image.Image:
    """Two to four textured layers, each over the last in irregular regions, then distractors in part colours."""
    pixels = _texture_layer(rng, size)
    for _ in range(int(rng.integers(1, 4))):
        alpha = _layer_alpha(rng, size)
        pixels = pixels * (1 - alpha) + _texture_layer(rng, size) * alpha
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    for _ in range(int(rng.integers(*nuisances.distractors))):
        _draw_distractor(image, rng, size)
    return image


def _draw_distractor(image: Image.Image, rng: np.random.Generator, size: int) -> None:
    """A shape in a class-defining colour, so colour seen in the background says nothing about the class: a
    head-hued disc, a body-coloured blob, or a wing-like patterned ellipse."""
    kind = int(rng.integers(3))
    centre = rng.uniform(0, size, size=2)
    radius = rng.uniform(0.025, 0.09) * size
    draw = ImageDraw.Draw(image)
    if kind == 0:
        hue = list(HEAD_HUES.values())[int(rng.integers(len(HEAD_HUES)))]
        rgb = _hsv(hue + rng.uniform(-8, 8), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        outline = _ellipse(centre[0], centre[1], radius, radius * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
        draw.polygon(_flat(outline), fill=rgb)
    elif kind == 1:
        rgb = _jitter_rgb(list(BODY_COLOURS.values())[int(rng.integers(len(BODY_COLOURS)))], rng, 14)
        k = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
        radii = 1.4 * radius * rng.uniform(0.5, 1.0, size=k)
        draw.polygon(_flat(centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)), fill=rgb)
    else:
        _draw_patterned_patch(image, rng, centre, radius)


def _draw_patterned_patch(image: Image.Image, rng: np.random.Generator, centre: np.ndarray, radius: float) -> None:
    """A wing-like ellipse in a wing base colour with a striped, dotted or checkered pattern (pixel units)."""
    a, b, tilt = 1.6 * radius, 0.65 * radius, rng.uniform(0, np.pi)
    base_rgb = _jitter_rgb(_WING_BASES[int(rng.integers(len(_WING_BASES)))], rng, 15)
    outline = _ellipse(centre[0], centre[1], a, b, tilt)
    ImageDraw.Draw(image).polygon(_flat(outline), fill=base_rgb)
    pattern = WING_PATTERNS[int(rng.integers(1, len(WING_PATTERNS)))]
    _paste_pattern(image, _wing_texture(pattern, centre, a, b, tilt), outline, _pattern_ink(base_rgb, rng))


def _draw_hard_occluders(canvas: _Canvas, rng: np.random.Generator, size: int, nuisances: _Nuisances) -> None:
    """In front of the bird: thick branches and a leaf cluster (hard: one to three branches in 60% of images,
    leaves in 35%); both hide what they cover (mask 0)."""
    if rng.random() < nuisances.branch_p:
        for _ in range(int(rng.integers(*nuisances.branches))):
            _draw_branch(canvas, rng, size, half_width=(0.025, 0.07))
    if rng.random() < nuisances.leaves_p:
        _draw_leaves(canvas, rng, size)


def _draw_leaves(canvas: _Canvas, rng: np.random.Generator, size: int) -> None:
    """Four to eight leaf-shaped ellipses around one point."""
    centre = rng.uniform(0.15, 0.85, size=2) * size
    for _ in range(int(rng.integers(4, 9))):
        a = rng.uniform(0.03, 0.07) * size
        spot = centre + rng.normal(0, 0.06, size=2) * size
        leaf = _ellipse(spot[0], spot[1], a, a * rng.uniform(0.35, 0.55), rng.uniform(0, np.pi), n=14)
        canvas.polygon(leaf, _jitter_rgb(_LEAF_GREENS[int(rng.integers(len(_LEAF_GREENS)))], rng, 15), 0)


def _hard_finish(image: Image.Image, rng: np.random.Generator, nuisances: _Nuisances) -> np.ndarray:
    """Whole-image nuisances, bird included: a linear illumination gradient with a colour cast, mild blur in half
    the images, Gaussian pixel noise. Returns (H, W, 3) uint8."""
    size = image.size[0]
    theta, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8)
    ramp = np.arange(size, dtype=np.float32) / max(1, size - 1) - 0.5
    slope = ramp[None, :] * math.cos(theta) + ramp[:, None] * math.sin(theta)
    gain = rng.uniform(0.75, 1.15) * (1 + strength * slope)
    cast = 1 + rng.uniform(-nuisances.cast, nuisances.cast, size=3)
    lit = np.asarray(image, dtype=np.float32) * gain[..., None] * cast.astype(np.float32)
    image = Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < nuisances.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8)) * size / 112))
    noise = rng.normal(0, rng.uniform(*nuisances.noise), size=(size, size, 3))
    return np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
