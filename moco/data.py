"""Image folders and lists, checked up front; augmentation that can resume mid-epoch.

Every sample is augmented under a random state that depends only on (data seed,
epoch, index): the crops do not depend on the number of loader workers or on where
a run was interrupted, so a resumed run sees exactly the batches it would have seen.

Pretraining needs no labels: its images are every image under DIR/train (class folders
or not), under DIR, or listed in a file (pretrain_images). The kNN monitor, main_knn.py
and main_lincls.py need class folders (require_labels).
"""

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from moco.augment import seeded
from moco.utils import UsageError, logger

# the image files found, for messages
IMAGE_KINDS = ", ".join(IMG_EXTENSIONS[:4]) + ", ..."


class BadImageError(UsageError):
    """An image file that cannot be decoded."""


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS)


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
            if _is_image(f)
        )
        if n == 0:
            raise UsageError(
                f"class folder {os.path.join(root, c)!r} holds no images "
                f"({IMAGE_KINDS}); add images or remove the folder"
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


class SeededImages(Dataset):
    """
    Samples (path, target) augmented by `transform` under the random states seeded
    from (data_seed, epoch, index). Indexed by an int (epoch 0) or by the (index, seed)
    pairs that EpochSampler yields. With skip_bad, an unreadable file is logged once
    and replaced by the next readable sample. decode=False hands the transform the
    file's path instead of the image (moco/batch_augment.py decodes batches on the
    training device). source names the folder or list in messages; with a list file,
    lines[i] is sample i's line, named when it cannot be read.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable,
        data_seed: int = 0,
        skip_bad: bool = False,
        decode: bool = True,
        source: str = "",
        lines: Sequence[int] | None = None,
    ):
        self.samples = samples
        self.transform = transform
        self.data_seed = data_seed
        self.skip_bad = skip_bad
        self.decode = decode
        self.source = source
        self.lines = lines
        # counted across loader workers
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._reported: set[str] = set()

    def __len__(self):
        return len(self.samples)

    def _named(self, i, error):
        """The error, naming sample i's line of the list file it comes from."""
        if self.lines is None:
            return error
        return BadImageError(f"{self.source} line {self.lines[i]}: {error}")

    def __getitem__(self, key):
        index, seed = (
            key
            if isinstance(key, tuple)
            else (key, sample_seed(self.data_seed, 0, key))
        )
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                img = load_image(path) if self.decode else path
                break
            except BadImageError as e:
                if not self.skip_bad:
                    raise self._named(i, e) from None
                if path not in self._reported:
                    self._reported.add(path)
                    self.skipped += 1
                    logger.warning(f"=> skipping: {self._named(i, e)}")
        else:
            raise BadImageError(f"no readable image in {self.source!r}")
        with seeded(seed):
            try:
                return self.transform(img), target
            except BadImageError as e:  # decode=False: the transform reads the file
                raise self._named(i, e) from None


class SeededImageFolder(SeededImages):
    """SeededImages over an ImageFolder root/<class>/<image>: targets are classes."""

    def __init__(self, root, transform, data_seed=0, skip_bad=False, decode=True):
        folder = ImageFolder(root, allow_empty=False)
        super().__init__(
            folder.samples, transform, data_seed, skip_bad, decode, source=root
        )
        self.root = root
        self.targets = folder.targets
        self.classes = folder.classes


# the target of an unlabelled image: pretraining never reads it, and as a class index
# it fails loudly
NO_LABEL = -1

EXPECTED_PRETRAIN_LAYOUT = (
    "DIR/train/<image> (at any depth, class folders optional), images under DIR, "
    "or --train-list FILE"
)


def _scan(folder):
    """(image file names, [(subfolder name, its (st_dev, st_ino))]) of one folder."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as e:
        raise UsageError(
            f"cannot list folder {folder!r} ({e.strerror or e}); fix its permissions "
            "or move it out of the data"
        ) from None
    images, subfolders = [], []
    for entry in entries:
        # a link to a folder is followed, as ImageFolder does
        if entry.is_dir():
            st = entry.stat()
            subfolders.append((entry.name, (st.st_dev, st.st_ino)))
        elif _is_image(entry.name):
            images.append(entry.name)
    return images, subfolders


def find_images(root: str) -> list[str]:
    """
    The path of every image file under `root`, at any depth, by listing folders only
    (no file is opened). Order: root's own images by name, then each folder of root
    by name, within it its folders by path and their images by name: on an ImageFolder
    root/<class>/... this is torchvision ImageFolder's order and its samples. A link
    back to a folder it is in is not followed again.
    """
    images, top = _scan(root)
    st = os.stat(root)
    root_ident = (st.st_dev, st.st_ino)
    paths = [os.path.join(root, name) for name in sorted(images)]
    for name, ident in sorted(top):
        found = []  # (folder, its image names)
        pending: list[tuple[str, tuple]] = [
            (os.path.join(root, name), (root_ident, ident))
        ]
        while pending:
            folder, ancestors = pending.pop()
            images, subfolders = _scan(folder)
            found.append((folder, images))
            pending += [
                (os.path.join(folder, sub), (*ancestors, sub_ident))
                for sub, sub_ident in subfolders
                if sub_ident not in ancestors
            ]
        for folder, images in sorted(found, key=lambda f: f[0]):
            paths += [os.path.join(folder, name) for name in sorted(images)]
    return paths


def read_train_list(list_file: str, data_dir: str) -> tuple[list[str], list[int]]:
    """
    The paths listed in `list_file`, one per line, absolute or relative to data_dir,
    in the file's order (blank lines and lines starting with # skipped), and the line
    number of each. Every listed file must exist.
    """
    what = f"--train-list {list_file!r}"
    if not os.path.isfile(list_file):
        raise UsageError(
            f"{what} does not exist; give a text file with one image path per line"
        )
    paths, lines = [], []
    try:
        # file names are bytes on POSIX: surrogateescape keeps any of them
        with open(list_file, encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, start=1):
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    paths.append(os.path.join(data_dir, entry))
                    lines.append(number)
    except OSError as e:
        raise UsageError(f"cannot read {what} ({e.strerror or e})") from None
    if not paths:
        raise UsageError(
            f"{what} lists no images (blank lines and # comments are skipped); put "
            "one image path per line, absolute or relative to DIR"
        )
    missing = [(n, p) for n, p in zip(lines, paths) if not os.path.isfile(p)]
    if missing:
        number, path = missing[0]
        more = f" (and {len(missing) - 1} more lines)" if len(missing) > 1 else ""
        raise UsageError(
            f"{list_file} line {number}: {path!r} is not a file{more}; fix or remove "
            "the line (relative paths are read from DIR)"
        )
    return paths, lines


@dataclass
class PretrainImages:
    """The images of pretraining and where they come from."""

    paths: list[str]
    # the folder or the list file they come from
    source: str
    # one line for the log: which layout was found
    layout: str
    # with a list file, each path's line in it
    lines: list[int] | None = None

    def dataset(
        self,
        transform: Callable,
        data_seed: int = 0,
        skip_bad: bool = False,
        decode: bool = True,
    ) -> SeededImages:
        """The paths as a SeededImages, each with the target NO_LABEL."""
        samples = [(path, NO_LABEL) for path in self.paths]
        return SeededImages(
            samples, transform, data_seed, skip_bad, decode, self.source, self.lines
        )


def pretrain_images(data_dir: str, train_list: str | None = None) -> PretrainImages:
    """
    The images to pretrain on: those listed in train_list, else every image under
    DIR/train (class folders or not: an ImageFolder gives ImageFolder's samples in its
    order), else every image under DIR when it has no train folder.
    """
    if train_list:
        paths, lines = read_train_list(train_list, data_dir)
        layout = f"training on the {len(paths)} images listed in {train_list}"
        return PretrainImages(paths, train_list, layout, lines)
    train = os.path.join(data_dir, "train")
    if os.path.isdir(train):
        paths = find_images(train)
        if not paths:
            raise UsageError(
                f"training folder {train!r} holds no images "
                f"({IMAGE_KINDS}); add images at any depth or "
                "give --train-list FILE"
            )
        layout = f"training on the {len(paths)} images under {train}"
        return PretrainImages(paths, train, layout)
    if not os.path.isdir(data_dir):
        raise UsageError(
            f"data folder {data_dir!r} does not exist; expected "
            + EXPECTED_PRETRAIN_LAYOUT
        )
    if os.path.isdir(os.path.join(data_dir, "val")):
        # training on DIR would train on the validation images
        raise UsageError(
            f"{data_dir!r} has a val folder but no train folder; put the training "
            f"images in {train} or give --train-list FILE"
        )
    paths = find_images(data_dir)
    if not paths:
        raise UsageError(
            f"no images under {data_dir!r} ({IMAGE_KINDS}); "
            f"expected {EXPECTED_PRETRAIN_LAYOUT}"
        )
    layout = f"no {train}: training on the {len(paths)} images under {data_dir}"
    return PretrainImages(paths, data_dir, layout)


def require_labels(data_dir: str, what: str) -> tuple[list[str], int, int]:
    """
    Refuse, naming `what` (e.g. "the kNN monitor (--knn-freq)"), data without labels:
    DIR/train and DIR/val must hold the same class folders of images. Returns (classes,
    number of training images, number of validation images).
    """
    layout = f"{data_dir}/train/<class>/<image> and {data_dir}/val/<class>/<image>"
    for split, name in (("train", "training"), ("val", "validation")):
        folder = os.path.join(data_dir, split)
        try:
            find_classes(folder)
        except OSError:
            problem = (
                "has no class folders" if os.path.isdir(folder) else "does not exist"
            )
            raise UsageError(
                f"{what} needs labelled images, but the {name} data folder {folder!r} "
                f"{problem}: use the layout {layout} (one folder of images per class)"
            ) from None
    train = os.path.join(data_dir, "train")
    classes, n_train = check_image_folder(train, "training data")
    return classes, n_train, check_val_folder(data_dir)


# warn when more queries than this meet an earlier key of their own image among the
# negatives (docs/small_datasets.md derives the fraction and the choice)
OWN_KEY_LIMIT = 0.01


def own_key_fraction(moco_k: int, n_images: int, keys_per_image: int = 1) -> float:
    """
    The fraction of queries whose queue holds an earlier key of their own image, with
    the images reshuffled every epoch. The queue spans r = K / (keys_per_image * N)
    epochs; an image's previous draw lies that close with probability r^2/2 (r <= 1),
    1 - (2 - r)^2/2 (1 <= r <= 2), else 1.
    """
    r = moco_k / (keys_per_image * n_images)
    if r <= 1:
        return r * r / 2
    return 1.0 - (2.0 - r) ** 2 / 2 if r < 2 else 1.0


def queue_warning(
    moco_k: int, n_images: int, keys_per_image: int = 1, keys_per_step: int = 1
) -> str | None:
    """
    One warning line when the queue is so long next to the training set that many
    queries meet their own image among the negatives, with the --moco-k to use; else
    None. keys_per_image: 2 with --symmetric (both crops' keys are enqueued);
    keys_per_step: the keys enqueued per step, which the queue must hold.
    """
    fraction = own_key_fraction(moco_k, n_images, keys_per_image)
    if fraction <= OWN_KEY_LIMIT:
        return None
    largest = math.sqrt(2 * OWN_KEY_LIMIT) * keys_per_image * n_images
    suggested = 2 ** int(math.log2(largest)) if largest >= 1 else 1
    epochs = moco_k / (keys_per_image * n_images)
    batch = (
        f" and a global batch of at most {max(1, suggested // keys_per_image)} "
        "(the queue holds at least one step's keys)"
        if suggested < keys_per_step
        else ""
    )
    return (
        f"--moco-k {moco_k} with {n_images} training images: the queue holds "
        f"{epochs:.2g} epochs' worth of keys, so {fraction:.1%} of the queries meet "
        f"an earlier key of their own image among the negatives; use --moco-k "
        f"{suggested} or smaller{batch} (under {OWN_KEY_LIMIT:.0%} of the queries; "
        "see docs/small_datasets.md)"
    )


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
