"""
Images/s of the pretraining input pipeline (decode + two augmented crops + to tensor +
normalise): the original's transforms, the project's fast ones and the batched path
(workers read bytes and draw crops; decode and augmentation in batches on --device).

    python bench/loader.py                       # v1 and v2, 224 px, 0 (in process), 1, 2 workers
    python bench/loader.py --aug-plus --workers 0 4 8 --images 400 --repeats 5
    python bench/loader.py --device cuda         # the batched path decodes with nvjpeg

The data is an ImageFolder of ImageNet-like JPEGs (about 500 x 375, quality 90) made
here: smooth colour fields, sharp-edged shapes and texture, the same for the same seed.
Each measurement is repeated and the implementations are interleaved within each repeat;
the table gives medians. With 0 workers everything runs in this process; the batched
path then reads and augments a batch at a time. The batched path augments one batch
before each timing starts, so that setting up the device and its JPEG decoder is not
timed. The figures are in docs/speed.md.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco.batch_augment import (  # noqa: E402
    BatchAugment,
    ReadAndSample,
    collate,
)
from moco.data import EpochSampler, SeededImageFolder  # noqa: E402
from moco.loader import TRANSFORM_IMPLS, normalization, pretrain_transform  # noqa: E402


def smooth_field(g, height, width, cells):
    """3 x height x width floats 0..255: muted random colours on a coarse grid, bicubic."""
    coarse = torch.rand(3, cells, cells, generator=g) * 255
    grey = coarse.mean(0)
    coarse = grey + 0.6 * (coarse - grey)  # photographs are rarely fully saturated
    return F.interpolate(coarse[None], (height, width), mode="bicubic")[0]


def photo(seed, width=500, height=375):
    """
    A photograph-like RGB image: a smooth colour field, a few shapes with their own
    colour fields and sharp edges (softened a little, as by a lens), and texture.
    """
    g = torch.Generator().manual_seed(seed)
    img = smooth_field(g, height, width, 4)
    shapes = Image.new("L", (width, height))
    for k in range(1, 6):
        # a star-shaped polygon: corners at sorted angles around a centre
        corners = int(torch.randint(3, 9, (1,), generator=g))
        angle = torch.rand(corners, generator=g).sort().values * 2 * np.pi
        radius = width * (0.05 + 0.2 * torch.rand(1, generator=g))
        radius = radius * (0.6 + 0.4 * torch.rand(corners, generator=g))
        centre = torch.rand(2, generator=g) * torch.tensor([width, height])
        points = centre + torch.stack([angle.cos(), angle.sin()], 1) * radius[:, None]
        ImageDraw.Draw(shapes).polygon([tuple(p) for p in points.tolist()], fill=k)
    shapes = torch.from_numpy(np.array(shapes))
    for k in range(1, 6):
        img = torch.where(shapes == k, smooth_field(g, height, width, 3), img)
    img = np.asarray(to_pil(img).filter(ImageFilter.GaussianBlur(0.8)), np.float32)
    img = torch.from_numpy(img).permute(2, 0, 1)
    grain = torch.randn(1, 1, height // 3, width // 3, generator=g)
    grain = F.interpolate(grain, (height, width), mode="bilinear")[0]
    return to_pil(img + 8 * grain + 5 * torch.randn(1, height, width, generator=g))


def to_pil(img):
    """3 x H x W floats -> RGB PIL image."""
    img = img.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(img.numpy())


def make_folder(root, images, classes=10, seed=0):
    """`images` distinct 500 x 375 (a quarter of them 375 x 500) JPEGs at quality 90."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        size = (375, 500) if rng.random() < 0.25 else (500, 375)  # (width, height)
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        img = photo(seed * images + i, *size)
        img.save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def in_process(dataset):
    """Images/s of one process calling the dataset (decode + transform), no DataLoader."""
    n = len(dataset)
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - start)


def batched_in_process(dataset, augment, batch_size, device):
    """Images/s of one process reading batches and augmenting them on `device`."""
    n = len(dataset)

    def batch(first):
        return collate([dataset[i] for i in range(first, min(n, first + batch_size))])

    warm_up(augment, batch(0)[0], device)
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        images, _ = batch(first)
        augment(images, device)
    synchronize(device)
    return n / (time.perf_counter() - start)


def warm_up(augment, images, device):
    """Augment a batch outside the timing: the device's and the decoder's set-up."""
    augment(images, device)
    synchronize(device)


def with_workers(dataset, workers, batch_size, augment=None, device=None):
    """
    Images/s through a DataLoader with `workers` processes, once they have started; with
    `augment`, each batch is also augmented on `device` in this process.
    """
    sampler = EpochSampler(dataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
        prefetch_factor=4,
        collate_fn=collate if augment else None,
        # as main_moco.py: the batched path's pixels copy to the GPU unwaited
        pin_memory=device is not None and device.type == "cuda",
    )
    images, _ = next(iter(loader))  # start the workers outside the timing
    if augment:
        warm_up(augment, images, device)
    start = time.perf_counter()
    n = 0
    for images, targets in loader:
        if augment:
            augment(images, device)
        n += len(targets)
    synchronize(device)
    rate = n / (time.perf_counter() - start)
    del loader
    return rate


def measure(dataset, workers, batch_size, augment=None, device=None):
    """Images/s of one implementation: in this process with 0 workers, else a loader."""
    if workers > 0:
        return with_workers(dataset, workers, batch_size, augment, device)
    if augment:
        return batched_in_process(dataset, augment, batch_size, device)
    return in_process(dataset)


def synchronize(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


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
    parser.add_argument(
        "--device", default="cpu", help="where the batched path decodes and augments"
    )
    return parser


def main(args):
    torch.set_num_threads(1)  # as in a DataLoader worker
    device = torch.device(args.device)
    recipes = ["v1"] if args.v1 else ["v2"] if args.aug_plus else ["v1", "v2"]
    impls = TRANSFORM_IMPLS + ("batched",)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_folder(os.path.join(tmp, "train"), args.images)
        print(
            f"data: {root}, {args.size} px crops, medians of {args.repeats} repeats, "
            f"batched on {device}"
        )
        print(
            f"{'recipe':6} {'workers':>7} "
            + " ".join(f"{i + ' img/s':>15}" for i in TRANSFORM_IMPLS)
            + f" {'fast/original':>14} {'batched img/s':>15} {'batched/original':>16}"
        )
        for recipe in recipes:
            datasets = {
                impl: SeededImageFolder(
                    root, pretrain_transform(recipe, args.size, impl)
                )
                for impl in TRANSFORM_IMPLS
            }
            datasets["batched"] = SeededImageFolder(
                root, ReadAndSample(recipe, args.size), decode=False
            )
            augments = {
                "batched": BatchAugment(recipe, args.size, *normalization("imagenet"))
            }
            for workers in args.workers:
                rates = {impl: [] for impl in impls}
                for _ in range(args.repeats):
                    for impl, dataset in datasets.items():
                        rates[impl].append(
                            measure(
                                dataset,
                                workers,
                                args.batch_size,
                                augments.get(impl),
                                device,
                            )
                        )
                med = {impl: statistics.median(r) for impl, r in rates.items()}
                print(
                    f"{recipe:6} {workers:>7} "
                    + " ".join(f"{med[i]:15.1f}" for i in TRANSFORM_IMPLS)
                    + f" {med['fast'] / med['original']:14.2f}"
                    + f" {med['batched']:15.1f}"
                    + f" {med['batched'] / med['original']:16.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
