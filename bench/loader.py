"""
Images/s of the pretraining input pipeline (decode + two augmented crops + to tensor +
normalise), the original's transforms against the project's fast ones, side by side.

    python bench/loader.py                       # v1 and v2, 224 px, 0 (in process), 1, 2 workers
    python bench/loader.py --aug-plus --workers 0 4 8 --images 400 --repeats 5

The data is an ImageFolder of ImageNet-like JPEGs (about 500 x 375, quality 90) cut from
the sample photographs that scikit-image (or scikit-learn) ships; neither is a project
dependency: `pip install scikit-image` to run this. Each measurement is repeated and the
implementations are interleaved within each repeat; the table gives medians.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco.data import EpochSampler, SeededImageFolder  # noqa: E402
from moco.loader import AUG_IMPLS, pretrain_transform  # noqa: E402


def sample_photos():
    """The colour photographs that scikit-image or scikit-learn ship, as H x W x 3 uint8."""
    photos = []
    try:
        import skimage.data

        for name in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "immunohistochemistry",
        ):
            photos.append(getattr(skimage.data, name)())
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos += list(load_sample_images().images)
    except ImportError:
        pass
    if not photos:
        sys.exit(
            "error: the benchmark needs sample photographs: pip install scikit-image"
        )
    return photos


def make_folder(root, images, classes=10, seed=0):
    """
    `images` distinct 500 x 375 (a quarter of them 375 x 500) JPEGs at quality 90: random
    crops of the photographs, rescaled, sometimes flipped, with a colour shift.
    """
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    for i in range(images):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        out = (375, 500) if rng.random() < 0.25 else (500, 375)  # PIL's (width, height)
        aspect = out[1] / out[0]
        h = int(min(height, width * aspect) * rng.uniform(0.4, 1.0))
        w = int(h / aspect)
        top = rng.integers(0, height - h + 1)
        left = rng.integers(0, width - w + 1)
        img = Image.fromarray(photo[top : top + h, left : left + w])
        img = np.asarray(img.resize(out, Image.BICUBIC), dtype=np.float32)
        img = img * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def in_process(dataset, n):
    """Images/s of one process calling the dataset (decode + transform), no DataLoader."""
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - start)


def with_workers(dataset, workers, batch_size):
    """Images/s through a DataLoader with `workers` processes, once they have started."""
    sampler = EpochSampler(dataset)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        drop_last=True, persistent_workers=True, prefetch_factor=4,
    )  # fmt: skip
    iter(loader).__next__()  # start the workers outside the timing
    start = time.perf_counter()
    n = sum(len(batch[1]) for batch in loader)
    rate = n / (time.perf_counter() - start)
    del loader
    return rate


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--aug-plus",
        action="store_true",
        help="only MoCo v2's recipe (default: v1 and v2)",
    )
    parser.add_argument("--v1", action="store_true", help="only MoCo v1's recipe")
    parser.add_argument(
        "--workers",
        default=[0, 1, 2],
        type=int,
        nargs="+",
        help="DataLoader workers; 0 = in process, no DataLoader",
    )
    parser.add_argument("--size", default=224, type=int, help="crop size")
    parser.add_argument("--images", default=300, type=int, help="images in the folder")
    parser.add_argument("--repeats", default=5, type=int)
    parser.add_argument("--batch-size", default=32, type=int)
    parser.add_argument(
        "--data", default="", help="use this folder (root/<class>/<image>)"
    )
    return parser  # fmt: skip


def main(args):
    torch.set_num_threads(1)  # as in a DataLoader worker
    recipes = [False] if args.v1 else [True] if args.aug_plus else [False, True]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_folder(os.path.join(tmp, "train"), args.images)
        print(f"data: {root}, {args.size} px crops, medians of {args.repeats} repeats")
        print(f"{'recipe':6} {'workers':>7} " + " ".join(f"{i + ' img/s':>15}" for i in AUG_IMPLS)
              + f" {'fast/original':>14}")  # fmt: skip
        for aug_plus in recipes:
            datasets = {
                impl: SeededImageFolder(
                    root, pretrain_transform(aug_plus, args.size, impl)
                )
                for impl in AUG_IMPLS
            }
            n = len(datasets["fast"])
            for workers in args.workers:
                rates = {impl: [] for impl in AUG_IMPLS}
                for _ in range(args.repeats):
                    for impl, dataset in datasets.items():
                        if workers == 0:
                            rates[impl].append(in_process(dataset, n))
                        else:
                            rates[impl].append(
                                with_workers(dataset, workers, args.batch_size)
                            )
                med = {impl: statistics.median(r) for impl, r in rates.items()}
                recipe = "v2" if aug_plus else "v1"
                print(f"{recipe:6} {workers:>7} "
                      + " ".join(f"{med[i]:15.1f}" for i in AUG_IMPLS)
                      + f" {med['fast'] / med['original']:14.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(get_args_parser().parse_args())
