"""Image folders, checked up front, with augmentation that can resume mid-epoch.

Every sample is augmented under a random state that depends only on (data seed,
epoch, index): the crops do not depend on the number of loader workers or on where
a run was interrupted, so a resumed run sees exactly the batches it would have seen.
"""

import os

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from moco.utils import UsageError, logger


class BadImageError(UsageError):
    """An image file that cannot be decoded."""


def check_image_folder(root, what="data"):
    """
    Refuse a folder that is not an ImageFolder (root/<class>/<image>) with a message
    naming the problem. Returns (classes, number of images).
    """
    layout = f"expected {root}/<class>/<image> (the ImageFolder layout)"
    if not os.path.isdir(root):
        raise UsageError(f"{what} folder {root!r} does not exist; {layout}")
    try:
        classes, _ = find_classes(root)
    except FileNotFoundError:
        raise UsageError(
            f"{what} folder {root!r} has no class folders; {layout}"
        ) from None
    total = 0
    for c in classes:
        n = sum(
            1
            for _, _, files in os.walk(os.path.join(root, c), followlinks=True)
            for f in files
            if f.lower().endswith(IMG_EXTENSIONS)
        )
        if n == 0:
            raise UsageError(
                f"class folder {os.path.join(root, c)!r} holds no images "
                f"({', '.join(IMG_EXTENSIONS[:4])}, ...); add images or remove the folder"
            )
        total += n
    return classes, total


def check_val_folder(data_dir, what="validation data"):
    """
    DATA/val as an ImageFolder with exactly the class folders of DATA/train (checked
    before), so that a label means the same class in both. Returns its number of images.
    """
    train, val = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    val_classes, total = check_image_folder(val, what)
    try:
        # a listing: the images were checked before
        train_classes, _ = find_classes(train)
    except FileNotFoundError:
        # raises, saying what is wrong
        check_image_folder(train, "training data")
        raise
    if val_classes != train_classes:
        only_val = sorted(set(val_classes) - set(train_classes))
        only_train = sorted(set(train_classes) - set(val_classes))
        raise UsageError(
            f"the class folders of {val!r} and {train!r} differ (only in val: "
            f"{only_val[:3] or 'none'}, only in train: {only_train[:3] or 'none'}); "
            "labels would not agree: use the same class folders in both"
        )
    return total


def load_image(path):
    """RGB PIL image, or BadImageError naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(
            f"cannot read image {path!r} ({e}); replace or remove it, or pass "
            "--skip-bad-images to skip unreadable files"
        ) from None


def sample_seed(data_seed, epoch, index):
    """The augmentation seed of one sample in one epoch."""
    return (data_seed * 0x9E3779B97F4A7C15 + epoch * 0x85EBCA77 + index) % (2**63)


class SeededImageFolder(Dataset):
    """
    ImageFolder samples (path, target) augmented by `transform` under torch's random
    state seeded from (data_seed, epoch, index). Indexed by an int (epoch 0) or by the
    (index, seed) pairs that EpochSampler yields. With skip_bad, an unreadable file is
    logged once and replaced by the next readable sample. decode=False hands the
    transform the file's path instead of the image (moco/batch_augment.py decodes
    batches on the training device).
    """

    def __init__(self, root, transform, data_seed=0, skip_bad=False, decode=True):
        folder = ImageFolder(root, allow_empty=False)
        self.root = root
        self.samples = folder.samples
        self.targets = folder.targets
        self.classes = folder.classes
        self.transform = transform
        self.data_seed = data_seed
        self.skip_bad = skip_bad
        self.decode = decode
        # counted across loader workers
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._reported = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = (
            key
            if isinstance(key, tuple)
            else (key, sample_seed(self.data_seed, 0, key))
        )
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = load_image(path) if self.decode else path
                break
            except BadImageError as e:
                if not self.skip_bad:
                    raise
                if path not in self._reported:
                    self._reported.add(path)
                    self.skipped += 1
                    logger.warning(f"=> skipping: {e}")
        else:
            raise BadImageError(f"no readable image in {self.root!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), target


class EpochSampler(DistributedSampler):
    """
    DistributedSampler's order (shuffled by epoch with seed 0, as the original) for one
    process too, without a process group; yields (index, augmentation seed) and can
    start at a given batch of the epoch.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, data_seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle)
        self.data_seed = data_seed
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Go to `epoch`, skipping its first `start` samples of this process."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start :]
        return iter([(i, sample_seed(self.data_seed, self.epoch, i)) for i in indices])

    def __len__(self):
        return self.num_samples - self.start
