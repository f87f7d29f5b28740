"""Generated JPEGs for the loader section and the dry run's CIFAR-10 stand-in, made in
parallel under the project's interpreter (numpy and PIL come from there):

    python tests/gpu/images.py ROOT N WIDTH HEIGHT CLASSES
"""

import multiprocessing
import os
import sys

import numpy as np
from PIL import Image


def make_image(root: str, i: int, width: int, height: int, classes: int) -> None:
    """Image i: a smooth random colour field with a little noise and a colour bias per
    class, landscape or (a quarter) portrait, at JPEG quality 90."""
    rng = np.random.default_rng(i)
    c = i % classes
    w, h = (height, width) if rng.random() < 0.25 else (width, height)
    coarse = rng.integers(0, 256, size=(max(h // 32, 2), max(w // 32, 2), 3))
    img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(h, w, 3))
    pixels += 40 * np.array([c % 3 == 0, c % 3 == 1, c % 3 == 2]) - 20
    folder = os.path.join(root, f"class{c}")
    os.makedirs(folder, exist_ok=True)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    img.save(os.path.join(folder, f"{i}.jpg"), quality=90)


def make_images(root: str, n: int, width: int, height: int, classes: int) -> None:
    """n JPEGs in root/class<i>/."""
    jobs = [(root, i, width, height, classes) for i in range(n)]
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.starmap(make_image, jobs, chunksize=16)


if __name__ == "__main__":
    root, *numbers = sys.argv[1:]
    make_images(root, *map(int, numbers))
