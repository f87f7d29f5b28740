"""A small generated detection set in Pascal VOC's layout, with boxes known exactly.

    python -m detection.voc_shapes OUT [--train07 N] [--train12 N] [--test N]

writes OUT/VOCdevkit/VOC2007 (trainval, test) and OUT/VOCdevkit/VOC2012 (trainval):
JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<set>.txt, as VOC's archives.
Each image holds one to three light shapes on a dark noisy background, apart from each
other; a shape's class is its outline (colour and size are drawn independently of it),
named after one of VOC's classes since the route's class list is VOC's. A box is the
extent of the shape's pixels, in VOC's convention (pixel indices from 1, inclusive).
Each image is drawn from its own seed (seed, split, index): the same bytes every run.
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

# (VOC class name, the shape drawn for it)
CLASSES = (("aeroplane", "triangle"), ("bicycle", "circle"), ("bird", "square"))
# (VOC year, image set, number of images of that set by default)
SPLITS = (("2007", "trainval", 64), ("2012", "trainval", 64), ("2007", "test", 32))


def _mask(shape, size, box):
    """The pixels of `shape` inscribed in box (x0, y0, x1, y1) of a size x size image."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "circle":
        draw.ellipse(box, fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    return np.asarray(mask) > 127


def draw_image(size, rng):
    """An RGB image (uint8 array) and its objects [(class name, (xmin, ..., ymax))]."""
    image = rng.uniform(20, 90, 3) + rng.normal(0, 8, (size, size, 3))
    taken = np.zeros((size, size), dtype=bool)
    objects = []
    for _ in range(rng.integers(1, 4)):
        name, shape = CLASSES[rng.integers(len(CLASSES))]
        for _attempt in range(20):  # a place apart from the shapes drawn
            side = int(rng.integers(size // 4, size * 3 // 5))
            x0, y0 = rng.integers(0, size - side, 2)
            box = (int(x0), int(y0), int(x0) + side - 1, int(y0) + side - 1)
            mask = _mask(shape, size, box)
            if not (mask & _grow(taken)).any():
                break
        else:
            continue
        taken |= mask
        image[mask] = rng.uniform(170, 255, 3)
        ys, xs = np.nonzero(mask)
        # VOC: 1-based indices of the first and last pixel
        objects.append((name, (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _grow(mask, margin=2):
    """mask with `margin` pixels around each of its pixels (shapes stay apart)."""
    grown = mask.copy()
    for axis in (0, 1):
        for shift in range(1, margin + 1):
            grown |= np.roll(mask, shift, axis) | np.roll(mask, -shift, axis)
    return grown


def annotation_xml(folder, name, size, objects):
    """VOC's XML annotation of an image."""
    lines = [
        "<annotation>",
        f"  <folder>{folder}</folder>",
        f"  <filename>{name}.jpg</filename>",
        f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
    ]
    for cls, (xmin, ymin, xmax, ymax) in objects:
        lines += [
            "  <object>",
            f"    <name>{cls}</name><pose>Unspecified</pose>",
            "    <truncated>0</truncated><difficult>0</difficult>",
            f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
            f"<ymax>{ymax}</ymax></bndbox>",
            "  </object>",
        ]
    return "\n".join(lines + ["</annotation>", ""])


def make_voc_shapes(root, counts=None, size=128, seed=0):
    """Write the set under root/VOCdevkit; counts: {(year, set): images}. Returns root."""
    counts = counts or {(y, s): n for y, s, n in SPLITS}
    for index, (year, image_set, _) in enumerate(SPLITS):
        folder = os.path.join(root, "VOCdevkit", f"VOC{year}")
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        names = []
        for i in range(counts.get((year, image_set), 0)):
            name = f"{year}_{image_set}_{i:06d}"
            rng = np.random.default_rng([seed, index, i])
            image, objects = draw_image(size, rng)
            Image.fromarray(image).save(
                os.path.join(folder, "JPEGImages", f"{name}.jpg"), quality=95
            )
            with open(os.path.join(folder, "Annotations", f"{name}.xml"), "w") as f:
                f.write(annotation_xml(f"VOC{year}", name, size, objects))
            names.append(name)
        with open(
            os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt"), "w"
        ) as f:
            f.write("".join(n + "\n" for n in names))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="write a generated detection set in Pascal VOC's layout"
    )
    parser.add_argument("out", help="output folder (gets VOCdevkit/)")
    for year, image_set, n in SPLITS:
        flag = f"--{'test' if image_set == 'test' else 'train' + year[2:]}"
        parser.add_argument(
            flag, type=int, default=n, help=f"images of VOC{year} {image_set}"
        )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = {
        ("2007", "trainval"): args.train07,
        ("2012", "trainval"): args.train12,
        ("2007", "test"): args.test,
    }
    make_voc_shapes(args.out, counts, args.size, args.seed)


if __name__ == "__main__":
    main()
