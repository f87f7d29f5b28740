"""MoCo learning on a CPU in minutes: pretrain, then evaluate against random init.

    python -m tools.demo [--data CIFAR10] [--output-dir demo_output] [--quick]

1. finds CIFAR-10 (tools/cifar10.py: --data, a cached copy, or torchvision's download)
   and takes a class-balanced part of it into OUTPUT/data; without CIFAR-10, or with
   --shapes, it draws the shapes dataset of tools/shapes.py instead, and says so;
2. pretrains a ResNet-18 with main_moco.py: the official CIFAR-10 demo's recipe
   (small-image stem, 8-way split BatchNorm, its augmentation, K, m, T, weight decay,
   cosine schedule) on fewer images and epochs;
3. evaluates the pretrained encoder and a randomly initialised one with main_knn.py
   and main_lincls.py (the linear probe on frozen features);
4. prints the table and plots the run to OUTPUT/curves.png (needs matplotlib).

Nothing here trains or evaluates by itself: every figure comes from the project's
programs, called in-process with the arguments printed before each step.
"""

import argparse
import os
import shutil
import time
from dataclasses import dataclass, replace

import main_knn
import main_lincls
import main_moco
from moco import checkpoint as ckpt
from moco.cli import check_ranges, run_cli
from moco.utils import UsageError, logger, setup_logging
from tools import shapes
from tools.cifar10 import default_cache_dir, find_cifar10
from tools.plot import plot_log

# names a folder this demo made, and may empty again
MARKER = ".moco-demo"
PARTS = ("data", "pretrain", "linear-random", "linear-moco", "curves.png")


@dataclass(frozen=True)
class Config:
    """The sizes of one demo run."""

    train_per_class: int
    val_per_class: int
    input_size: int
    epochs: int
    batch_size: int
    lr: float
    moco_k: int
    linear_epochs: int
    linear_lr: float
    # kNN monitor every N epochs (0: off)
    knn_freq: int
    # augmentation recipe (main_moco.py --aug)
    aug: str = "cifar10"


# about 9 minutes on 2 CPU cores
CIFAR10 = Config(
    train_per_class=500,
    val_per_class=100,
    input_size=32,
    epochs=2,
    batch_size=256,
    lr=0.06,
    moco_k=2048,
    linear_epochs=3,
    linear_lr=30.0,
    knn_freq=0,
)
# the generated fallback: 8 classes drawn at the input size. MoCo v1's strong hue jitter
# takes away the colours (random, and the easiest cue), its crops keep most of a shape;
# more, smaller steps; the kNN monitor each epoch shows the encoder telling the shapes
# apart better
SHAPES = replace(CIFAR10, aug="v1", batch_size=128, epochs=3, knn_freq=1)
# --quick: the same pipeline at toy size, for a smoke test
QUICK = Config(
    train_per_class=8,
    val_per_class=4,
    input_size=16,
    epochs=1,
    batch_size=16,
    lr=0.06,
    moco_k=64,
    linear_epochs=1,
    linear_lr=30.0,
    knn_freq=1,
)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="MoCo on a CPU in minutes: pretraining on part of CIFAR-10 (or on "
        "generated shapes without it), then kNN and linear accuracy against a randomly "
        "initialised encoder"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="CIFAR-10 as an ImageFolder (train/, val/) or a .tar.gz of one (default: "
        "the cached copy, else torchvision's download, else generated shapes)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=f"where CIFAR-10 is unpacked or downloaded once (default: "
        f"{default_cache_dir()})",
    )
    parser.add_argument(
        "--shapes",
        action="store_true",
        help="use the generated shapes dataset, not CIFAR-10",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never download CIFAR-10 (without --data or a cached copy: shapes)",
    )
    parser.add_argument(
        "--output-dir",
        default="demo_output",
        metavar="DIR",
        help="where the data, checkpoints, logs and plot go (default: demo_output; a "
        "previous demo run there is replaced)",
    )
    parser.add_argument(
        "--epochs",
        default=None,
        type=int,
        metavar="N",
        help=f"pretraining epochs (default: {CIFAR10.epochs})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a toy-sized run in seconds: checks the pipeline, learns nothing",
    )
    parser.add_argument(
        "--seed",
        default=0,
        type=int,
        help="seed of the subset, the weights and the augmentations",
    )
    parser.add_argument(
        "-j",
        "--workers",
        default=0,
        type=int,
        metavar="N",
        help="data loading worker processes (default: 0, in the main process: the "
        "fastest on 2 cores)",
    )
    return parser


def prepare_output_dir(path):
    """Make `path` the demo's folder, emptying a previous demo run; refuse other folders."""
    if (
        os.path.isdir(path)
        and os.listdir(path)
        and not os.path.exists(os.path.join(path, MARKER))
    ):
        raise UsageError(
            f"--output-dir {path!r} is not empty and was not made by the demo; "
            "choose a new or empty folder"
        )
    ckpt.check_output_dir(path)
    for name in PARTS:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write("made by python -m tools.demo; emptied by its next run\n")


def run_step(title, module, argv):
    """Run `module`.main on `argv` in this process, printing the command first."""
    logger.info(f"\n=== {title}\n$ python {module.__name__}.py {' '.join(argv)}")
    return module.main(module.get_args_parser().parse_args(argv))


def take_subset(source, out, train_per_class, val_per_class):
    """
    OUT/{train,val}/<class>/: the first images of each class of `source` (sorted by
    name), linked where the file system allows, else copied. Returns the classes.
    """
    classes = sorted(os.listdir(os.path.join(source, "train")))
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in classes:
            src = os.path.join(source, split, c)
            dst = os.path.join(out, split, c)
            os.makedirs(dst)
            names = sorted(os.listdir(src))[:n]
            if len(names) < n:
                raise UsageError(
                    f"{src!r} holds {len(names)} images; the demo takes {n} of each class"
                )
            for name in names:
                try:
                    os.symlink(
                        os.path.abspath(os.path.join(src, name)),
                        os.path.join(dst, name),
                    )
                except OSError:
                    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return classes


def prepare_data(args, config, data):
    """OUT/data from CIFAR-10, or from generated shapes; returns (name, classes)."""
    root, how = (
        (None, "--shapes")
        if args.shapes
        else find_cifar10(
            args.data, args.cache_dir, allow_download=not args.no_download
        )
    )
    if root is not None:
        logger.info(f"=> CIFAR-10 from {how}: {root}")
        classes = take_subset(root, data, config.train_per_class, config.val_per_class)
        return "CIFAR-10", classes
    logger.info(f"=> CIFAR-10 not used ({how}): the generated shapes dataset instead")
    shapes.make_shapes(
        data, config.train_per_class, config.val_per_class, config.input_size, args.seed
    )
    return "shapes", list(shapes.CLASSES)


def run_demo(args, config=None):
    """
    The whole demo; returns {(encoder, protocol): accuracy} and the plot's path.
    config: the sizes (default: CIFAR10's, or SHAPES' when the shapes are drawn).
    """
    setup_logging()
    start = time.time()
    output_dir = args.output_dir
    prepare_output_dir(output_dir)
    data = os.path.join(output_dir, "data")
    pretrain = os.path.join(output_dir, "pretrain")
    name, classes = prepare_data(args, config or CIFAR10, data)
    if config is None:
        config = CIFAR10 if name == "CIFAR-10" else SHAPES
    if args.epochs is not None:
        config = replace(config, epochs=args.epochs)
    n_val = config.val_per_class * len(classes)
    logger.info(
        f"=> dataset: {name}, {config.train_per_class * len(classes)} training and "
        f"{n_val} held-out images, {len(classes)} classes ({', '.join(classes)}), in "
        f"{data} ({time.time() - start:.1f} s)"
    )
    common = [
        *("-a", "resnet18", "--small-stem", "--input-size", str(config.input_size)),
        *("--normalize", "cifar10", "-j", str(args.workers), "--seed", str(args.seed)),
    ]

    # the images are the input size already: kNN on them as they are
    knn = ["--knn-crop", "none"]
    results = {}
    results["random", "knn"] = run_step(
        "kNN accuracy of a randomly initialised encoder",
        main_knn,
        [data, *common, *knn, "-b", "256"],
    )
    # the official CIFAR-10 demo's recipe, on a smaller scale
    recipe = [
        *("--aug", config.aug, "--bn-splits", "8", "--wd", "5e-4", "--cos"),
        *("--moco-m", "0.99", "--moco-t", "0.1", "--knn-features", "head"),
    ]
    run_step(
        f"MoCo pretraining (the official CIFAR-10 demo's recipe, {config.aug} "
        "augmentation)",
        main_moco,
        [
            data,
            *common,
            *recipe,
            *("--epochs", str(config.epochs), "-b", str(config.batch_size)),
            *("--lr", str(config.lr), "--moco-k", str(config.moco_k)),
            *("--knn-freq", str(config.knn_freq), *knn, "-p", "5"),
            *("--output-dir", pretrain),
        ],
    )
    pretrained = os.path.join(pretrain, f"checkpoint_{config.epochs - 1:04d}.pth.tar")
    results["moco", "knn"] = run_step(
        "kNN accuracy of the MoCo encoder",
        main_knn,
        [data, *common, *knn, "-b", "256", "--pretrained", pretrained],
    )
    # the original's protocol (lr 30), the rate dropped for the last epoch
    linear = [
        *("--epochs", str(config.linear_epochs), "-b", "256", "--lr"),
        *(str(config.linear_lr), "--schedule", str(config.linear_epochs - 1)),
        *("-p", "100"),
    ]
    results["random", "linear"] = run_step(
        "linear probe on the frozen random encoder",
        main_lincls,
        [
            data,
            *common,
            *linear,
            "--output-dir",
            os.path.join(output_dir, "linear-random"),
        ],
    )
    results["moco", "linear"] = run_step(
        "linear probe on the frozen MoCo encoder",
        main_lincls,
        [
            data,
            *common,
            *linear,
            *("--pretrained", pretrained),
            *("--output-dir", os.path.join(output_dir, "linear-moco")),
        ],
    )

    references = {
        "random init (backbone)": results["random", "knn"],
        "MoCo, end (backbone)": results["moco", "knn"],
    }
    plot = save_plot(pretrain, os.path.join(output_dir, "curves.png"), references)
    logger.info("\n" + format_table(results, name, n_val, len(classes)))
    if plot:
        logger.info(f"=> plot of the run: {plot}")
    logger.info(f"=> total time {time.time() - start:.0f} s")
    return results, plot


def save_plot(pretrain_dir, out, references):
    """The run's curves, or None with a hint when matplotlib is missing."""
    try:
        return plot_log(pretrain_dir, out, references=references)
    # matplotlib is optional
    except UsageError as e:
        logger.info(f"=> no plot: {e}")
        return None


def format_table(results, name, n_val, num_classes):
    rows = [
        ("encoder", "kNN acc@1", "linear acc@1"),
        ("random init", *(f"{results['random', p]:.1f}" for p in ("knn", "linear"))),
        ("MoCo", *(f"{results['moco', p]:.1f}" for p in ("knn", "linear"))),
    ]
    lines = [f"{a:<12} {b:>10} {c:>13}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    title = (
        f"accuracy (%) on {n_val} held-out images of {name}, {num_classes} classes "
        f"(chance {100 / num_classes:.1f}); kNN on backbone features:"
    )
    return "\n".join([title, *lines])


def main(args):
    epochs = {} if args.epochs is None else {"--epochs": args.epochs}
    check_ranges(positive=epochs, non_negative={"-j/--workers": args.workers})
    return run_demo(args, QUICK if args.quick else None)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
