"""CIFAR-10 as an ImageFolder for the demo, from wherever it can be had.

    python -m tools.cifar10 [--data FOLDER_OR_TARBALL] [--cache-dir DIR]

In this order: `--data` (an ImageFolder with train/ and val/, or a .tar.gz of one);
a copy cached by an earlier run; torchvision's download of the official CIFAR-10
(written once as an ImageFolder of PNGs). A tarball or a download is unpacked into the
cache once (`$XDG_CACHE_HOME/moco-demo`, else ~/.cache/moco-demo).
"""

import argparse
import os
import shutil
import socket
import tarfile

from torchvision.datasets import CIFAR10

from moco.cli import run_cli
from moco.utils import UsageError, logger, setup_logging

TARBALLS = (".tar.gz", ".tgz", ".tar")
# written last into a folder this module filled: its presence means complete
DONE = ".complete"
CACHED = "cifar10"


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "moco-demo")


def image_folder_root(path):
    """`path` or its only subfolder, whichever holds train/ and val/; else None."""
    candidates = [path]
    if os.path.isdir(path):
        candidates += [os.path.join(path, d) for d in sorted(os.listdir(path))]
    for root in candidates:
        if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
            return root
    return None


def unpack(tarball, cache_dir):
    """Extract `tarball` into the cache once; returns the extracted folder."""
    name = os.path.basename(tarball)
    for ext in TARBALLS:
        name = name.removesuffix(ext)
    out = os.path.join(cache_dir, "unpacked", name)
    if not os.path.exists(os.path.join(out, DONE)):
        logger.info(f"=> unpacking {tarball} into {out}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        try:
            with tarfile.open(tarball) as tar:
                # "data": no absolute paths, links out of the folder or devices
                tar.extractall(out, filter="data")
        except (tarfile.TarError, OSError) as e:
            shutil.rmtree(out, ignore_errors=True)
            raise UsageError(f"--data {tarball!r} cannot be unpacked ({e})") from None
        open(os.path.join(out, DONE), "w").close()
    return out


def from_data(data, cache_dir):
    """The ImageFolder root that --data names (a folder or a tarball of one)."""
    if os.path.isfile(data) and data.endswith(TARBALLS):
        data = unpack(data, cache_dir)
    elif not os.path.isdir(data):
        raise UsageError(
            f"--data {data!r} is neither a folder nor a {'/'.join(TARBALLS)} file"
        )
    root = image_folder_root(data)
    if root is None:
        raise UsageError(
            f"--data {data!r} holds no train/ and val/ folders (the ImageFolder layout "
            "DATA/train/<class>/<image>, DATA/val/<class>/<image>)"
        )
    return root


def download(cache_dir, timeout=20):
    """torchvision's CIFAR-10, written once as an ImageFolder of PNGs; its root."""
    out = os.path.join(cache_dir, CACHED)
    raw = os.path.join(cache_dir, "download")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        splits = {
            split: CIFAR10(raw, train=split == "train", download=True)
            for split in ("train", "val")
        }
    finally:
        socket.setdefaulttimeout(previous)
    logger.info(f"=> writing CIFAR-10 as an ImageFolder of PNGs to {out}")
    shutil.rmtree(out, ignore_errors=True)
    for split, dataset in splits.items():
        for c in dataset.classes:
            os.makedirs(os.path.join(out, split, c))
        for i, (img, label) in enumerate(dataset):
            img.save(os.path.join(out, split, dataset.classes[label], f"{i:05d}.png"))
    open(os.path.join(out, DONE), "w").close()
    shutil.rmtree(raw, ignore_errors=True)
    return out


def find_cifar10(data=None, cache_dir=None, allow_download=True):
    """
    (ImageFolder root, where it came from) of CIFAR-10, or (None, why not): --data, the
    cached copy, then torchvision's download.
    """
    cache_dir = cache_dir or default_cache_dir()
    if data:
        return from_data(data, cache_dir), f"--data {data}"
    cached = os.path.join(cache_dir, CACHED)
    if os.path.exists(os.path.join(cached, DONE)):
        return cached, f"the cached copy in {cached}"
    if not allow_download:
        return None, f"no --data and no cached copy in {cached}"
    try:
        return download(cache_dir), "torchvision's download, now cached"
    except Exception as e:  # offline, a proxy, a full disk: fall back, saying why
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        return None, f"no --data, no cached copy in {cached}, download failed: {reason}"


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="find or fetch CIFAR-10 as an ImageFolder and print its folder"
    )
    parser.add_argument("--data", default=None, help="a folder or a .tar.gz of one")
    parser.add_argument(
        "--cache-dir", default=None, help=f"(default: {default_cache_dir()})"
    )
    return parser


def main(args):
    setup_logging()
    root, how = find_cifar10(args.data, args.cache_dir)
    if root is None:
        raise UsageError(f"CIFAR-10 not found: {how}")
    logger.info(f"=> CIFAR-10 in {root} ({how})")
    return root


if __name__ == "__main__":
    run_cli(main, get_args_parser())
