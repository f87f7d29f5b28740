"""A small offline image dataset for the demo: shapes labelled by their outline.

    python -m tools.shapes OUT [--train-per-class N] [--val-per-class N] [--seed S]

writes OUT/train/<shape>/*.png and OUT/val/<shape>/*.png (the ImageFolder layout).
Everything but the outline is drawn at random, independently of the label: the colours
of shape and background (from a small palette), size, position and rotation. A
random-init encoder sorts these images mostly by colour; a label-free method has to
find out that the outline is what tells one image from another.

Each image is drawn from its own seed (seed, split, class, index), so a set is the
same bytes on every run, and growing a split keeps the images it already had.
"""

import argparse
import colorsys
import math
import os

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "crescent", "cross", "heart", "ring", "square", "star", "triangle")
SPLITS = ("train", "val")
SUPERSAMPLE = 4


def _polygon(points, center, radius, angle):
    """Unit-circle points -> pixel points, rotated by angle and scaled to radius."""
    c, s = math.cos(angle), math.sin(angle)
    cx, cy = center
    return [
        (cx + radius * (x * c - y * s), cy + radius * (x * s + y * c))
        for x, y in points
    ]


def _regular(n, phase=0.0):
    return [
        (math.cos(phase + 2 * math.pi * i / n), math.sin(phase + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _star(n=5, inner=0.45):
    return [
        (
            r * math.cos(math.pi * i / n - math.pi / 2),
            r * math.sin(math.pi * i / n - math.pi / 2),
        )
        for i, r in zip(range(2 * n), [1.0, inner] * n)
    ]


def _heart(steps=48):
    pts = []
    for i in range(steps):
        t = 2 * math.pi * i / steps
        x = 16 * math.sin(t) ** 3
        y = (
            13 * math.cos(t)
            - 5 * math.cos(2 * t)
            - 2 * math.cos(3 * t)
            - math.cos(4 * t)
        )
        pts.append((x / 17, -y / 17 + 0.1))
    return pts


_CROSS = [
    (-1, -0.33),
    (-0.33, -0.33),
    (-0.33, -1),
    (0.33, -1),
    (0.33, -0.33),
    (1, -0.33),
    (1, 0.33),
    (0.33, 0.33),
    (0.33, 1),
    (-0.33, 1),
    (-0.33, 0.33),
    (-1, 0.33),
]
_POLYGONS = {
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),
    "star": _star(),
    "cross": _CROSS,
    "heart": _heart(),
}


def _draw_mask(draw, shape, center, radius, angle):
    """Draw the shape in white on a black 'L' image."""
    cx, cy = center
    if shape in _POLYGONS:
        draw.polygon(_polygon(_POLYGONS[shape], center, radius, angle), fill=255)
        return
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw.ellipse(box, fill=255)
    if shape == "ring":
        r = radius * 0.55
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    elif shape == "crescent":
        dx, dy = 0.5 * radius * math.cos(angle), 0.5 * radius * math.sin(angle)
        r = radius * 0.85
        draw.ellipse((cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r), fill=0)
    elif shape != "circle":
        raise ValueError(f"unknown shape {shape!r}")


PALETTE = 4  # hues for the background, and as many, half a step apart, for the shape


def _colour(hue, value):
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, 0.8, value)
    return np.array([r, g, b]) * 255


def draw_shape(shape, size, rng):
    """One RGB image (size x size, uint8 array) of `shape`, everything else at random."""
    # a dark background and a light shape, each of one of PALETTE hues: colour dominates
    # the pixels (a random encoder sorts by it) yet says little about the image, as 16
    # colour pairs are shared by a sixteenth of the images each
    hues = np.arange(PALETTE) / PALETTE
    background = _colour(rng.choice(hues), 0.35)
    fg = _colour(rng.choice(hues) + 0.5 / PALETTE, 0.95)

    # the outline, drawn large and averaged down: smooth edges at any size
    big = size * SUPERSAMPLE
    radius = rng.uniform(0.3, 0.45) * big
    margin = big / 2 - radius
    center = big / 2 + rng.uniform(-0.5, 0.5, 2) * margin
    mask = Image.new("L", (big, big), 0)
    _draw_mask(ImageDraw.Draw(mask), shape, center, radius, rng.uniform(0, 2 * math.pi))
    mask = mask.resize((size, size), Image.Resampling.BOX)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255
    img = background * (1 - alpha) + fg * alpha
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def image_rng(seed, split, class_index, index):
    return np.random.default_rng([seed, SPLITS.index(split), class_index, index])


def make_shapes(
    root, train_per_class=500, val_per_class=100, size=32, seed=0, classes=CLASSES
):
    """Write root/{train,val}/<shape>/<index>.png; returns root."""
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, shape in enumerate(classes):
            folder = os.path.join(root, split, shape)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = draw_shape(shape, size, image_rng(seed, split, c, i))
                Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.png"))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description="write the demo's shapes dataset")
    parser.add_argument("out", help="output folder (gets train/ and val/)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_shapes(
        args.out, args.train_per_class, args.val_per_class, args.size, args.seed
    )


if __name__ == "__main__":
    main()
