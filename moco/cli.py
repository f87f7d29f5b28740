"""The command-line flags the programs share, and how a program reports a usage error.

main_moco.py and main_lincls.py keep the flags of pytorch/examples' ImageNet training
(each with its own defaults, as the original); every program takes the launch flags
of moco/distributed.py and the image flags below.
"""

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from moco.distributed import Launch
from moco.knn import CROPS, FEATURES, KnnOptions
from moco.loader import NORMALIZATIONS
from moco.models import model_names
from moco.utils import ONE_LINE_ERRORS, UsageError, one_line


def run_cli(
    main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser
) -> Any:
    """
    Parse arguments and run main(args); a UsageError or a NonFiniteLossError ends as
    one line and exit 2.
    """
    args = parser.parse_args()
    try:
        return main(args)
    except ONE_LINE_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def check_ranges(
    positive: Mapping[str, float] | None = None,
    non_negative: Mapping[str, float] | None = None,
) -> None:
    """Refuse a value out of range, naming its flag: {flag: value} for each kind."""
    for name, value in (positive or {}).items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    for name, value in (non_negative or {}).items():
        if value < 0:
            raise UsageError(f"{name} must be zero or positive, got {value}")


TRAINING_BATCH_HELP = (
    "mini-batch size (default: 256), this is the total batch size of all GPUs on the "
    "current node"
)


def add_data_arguments(
    parser: argparse.ArgumentParser, batch_help: str = TRAINING_BATCH_HELP
) -> None:
    """The dataset, the architecture, the loader workers and the node's batch."""
    parser.add_argument(
        "data", metavar="DIR", help="path to dataset (DIR/train, DIR/val)"
    )
    parser.add_argument(
        "-a",
        "--arch",
        metavar="ARCH",
        default="resnet50",
        help="model architecture, a torchvision classification model: "
        + " | ".join(model_names())
        + " (default: resnet50)",
    )
    parser.add_argument(
        "-j",
        "--workers",
        default=32,
        type=int,
        metavar="N",
        help="number of data loading workers of the node (default: 32)",
    )
    parser.add_argument(
        "-b",
        "--batch-size",
        default=256,
        type=int,
        metavar="N",
        help=batch_help,
    )


def add_training_arguments(
    parser: argparse.ArgumentParser,
    resume_help: str,
    lr_help: str = "initial learning rate (default: %(default)s)",
) -> None:
    """
    The ImageNet training flags; the script sets the defaults of --epochs, --lr,
    --schedule and --wd with parser.set_defaults, as each of the original's did.
    """
    parser.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help="number of total epochs to run (default: %(default)s)",
    )
    parser.add_argument(
        "--start-epoch",
        default=0,
        type=int,
        metavar="N",
        help="manual epoch number (useful on restarts)",
    )
    parser.add_argument(
        "--lr",
        "--learning-rate",
        type=float,
        metavar="LR",
        help=lr_help,
        dest="lr",
    )
    parser.add_argument(
        "--schedule",
        nargs="*",
        type=int,
        help="learning rate schedule (when to drop lr by 10x; default: %(default)s)",
    )
    parser.add_argument(
        "--momentum",
        default=0.9,
        type=float,
        metavar="M",
        help="momentum of SGD solver",
    )
    parser.add_argument(
        "--wd",
        "--weight-decay",
        type=float,
        metavar="W",
        help="weight decay (default: %(default)s)",
        dest="weight_decay",
    )
    parser.add_argument(
        "-p",
        "--print-freq",
        default=10,
        type=int,
        metavar="N",
        help="print frequency (default: 10)",
    )
    parser.add_argument(
        "--resume", default="", type=str, metavar="PATH", help=resume_help
    )
    parser.add_argument(
        "--seed",
        default=None,
        type=int,
        help="seed for initializing training; makes a run reproducible",
    )
    parser.add_argument(
        "--output-dir",
        default=".",
        metavar="DIR",
        help="where checkpoints and logs go (default: the current folder)",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="log and skip unreadable training images instead of stopping",
    )


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """Image size, stem and normalisation, which must match between pretraining and use."""
    group = parser.add_argument_group("images")
    group.add_argument(
        "--input-size",
        default=224,
        type=int,
        metavar="PX",
        help="crop size in pixels (default: 224)",
    )
    group.add_argument(
        "--small-stem",
        action="store_true",
        help="ResNet stem for small images: conv1 3x3 stride 1, no max-pool (the "
        "official CIFAR-10 demo's)",
    )
    group.add_argument(
        "--normalize",
        default="imagenet",
        choices=tuple(NORMALIZATIONS),
        help="mean and std the images are normalised with: imagenet (default) or "
        "cifar10 (the CIFAR-10 demo's)",
    )


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The original's distributed flags, and this project's two additions."""
    group = parser.add_argument_group("distributed training")
    group.add_argument(
        "--world-size",
        default=-1,
        type=int,
        help="number of nodes for distributed training",
    )
    group.add_argument(
        "--rank", default=-1, type=int, help="node rank for distributed training"
    )
    group.add_argument(
        "--dist-url",
        default="tcp://224.66.41.62:23456",
        type=str,
        help="url used to set up distributed training",
    )
    group.add_argument(
        "--dist-backend",
        default="nccl",
        type=str,
        help="distributed backend (gloo is used where there is no GPU)",
    )
    group.add_argument("--gpu", default=None, type=int, help="GPU id to use.")
    group.add_argument(
        "--multiprocessing-distributed",
        action="store_true",
        help="Use multi-processing distributed training to launch N processes per "
        "node, which has N GPUs",
    )
    group.add_argument(
        "--procs-per-node",
        default=0,
        type=int,
        metavar="N",
        help="processes per node with --multiprocessing-distributed (default: one "
        "per GPU, or 1 without GPU)",
    )
    group.add_argument(
        "--dist-timeout",
        default=1800,
        type=int,
        metavar="S",
        help="seconds before a collective waiting on a dead process fails",
    )


def add_knn_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
) -> None:
    """The kNN options that main_moco.py's monitor and main_knn.py share."""
    parser.add_argument(
        "--knn-k", default=200, type=int, help="number of neighbours (default: 200)"
    )
    parser.add_argument(
        "--knn-t", default=0.1, type=float, help="kNN temperature (default: 0.1)"
    )
    parser.add_argument(
        "--knn-features",
        default="backbone",
        choices=FEATURES,
        help="backbone: the encoder without its head, the features a linear probe or "
        "a detector is given (default, for any checkpoint); head: the head's output, "
        "where the contrastive loss compares images (the official CIFAR-10 demo's "
        "monitor)",
    )
    parser.add_argument(
        "--knn-crop",
        default="center",
        choices=CROPS,
        help="center: resize to input-size*256/224 and take the centre crop, as "
        "ImageNet is evaluated (default); none: each image as it is, for data already "
        "at --input-size (32-px CIFAR images, as the CIFAR-10 demo)",
    )


def launch_settings(args: argparse.Namespace) -> Launch:
    """The launch flags' values."""
    return Launch(**{f.name: getattr(args, f.name) for f in fields(Launch)})


def knn_options(args: argparse.Namespace) -> KnnOptions:
    """The kNN flags' values (and the image size and normalisation they go with)."""
    return KnnOptions(
        args.knn_k,
        args.knn_t,
        args.knn_features,
        args.knn_crop,
        args.normalize,
        args.input_size,
    )
