"""MoCo learning on a CPU in minutes: pretrain, then evaluate against random init.

    python -m tools.demo [--data CIFAR10] [--output-dir demo_output] [--quick]

1. finds CIFAR-10 (tools/cifar10.py: --data, a cached copy, or torchvision's download)
   and takes a class-balanced part of it into OUTPUT/data, the evaluation set; without
   CIFAR-10, or with --shapes, it draws the shapes dataset of tools/shapes.py instead,
   and says so;
2. evaluates a randomly initialised ResNet-18 with main_lincls.py --cached-features
   --knn: the backbone's features of OUTPUT/data extracted once, the weighted kNN
   classifier and the linear probe trained on them;
3. measures the speed of pretraining in a few steps of main_moco.py and sizes the
   pretraining to the time left of --budget (how many training images, how many
   epochs), printing that decision;
4. pretrains with main_moco.py: the official CIFAR-10 demo's recipe (small-image stem,
   8-way split BatchNorm, its augmentation, m, T, weight decay, cosine schedule) with a
   smaller batch and queue;
5. evaluates the pretrained encoder as in 2, on the same images;
6. prints the table and a line on the loss (against chance, ln(K+1), and its trend at
   the end), and plots the run to OUTPUT/curves.png (needs matplotlib).

Nothing here trains or evaluates by itself: every figure comes from the project's
programs, called in-process with the arguments printed before each step.
"""

import argparse
import math
import os
import shutil
import time
from dataclasses import dataclass, replace

import main_lincls
import main_moco
from moco import checkpoint as ckpt
from moco.cli import check_ranges, run_cli
from moco.utils import UsageError, logger, setup_logging
from tools import shapes
from tools.cifar10 import default_cache_dir, find_cifar10
from tools.plot import plot_log, read_log

# seconds kept for what the plan does not time: starting the pretraining, saving its
# checkpoint, the plot
RESERVE_S = 15
# the plan assumes this share of the speed measured over the first steps
SPEED_MARGIN = 0.9
# names a folder this demo made, and may empty again
MARKER = ".moco-demo"
PARTS = (
    "data",
    "speed",
    "pretrain-data",
    "pretrain",
    "linear-random",
    "linear-moco",
    "curves.png",
)


@dataclass(frozen=True)
class Config:
    """The sizes of one demo run."""

    # the evaluation set: images of each class in OUTPUT/data/{train,val}
    train_per_class: int
    val_per_class: int
    input_size: int
    batch_size: int
    lr: float
    moco_k: int
    # seconds the whole demo aims at; the pretraining gets what the rest leaves
    budget_s: float
    # pretraining epochs at most, when all training images fit in the budget
    max_epochs: int
    # pretraining images of each class at most (CIFAR-10 has 5,000)
    max_per_class: int = 5000
    # epochs of the linear probe on the cached features
    probe_epochs: int = 100
    # steps of the speed measurement; the first, slower one is not counted
    speed_steps: int = 4
    # augmentation recipe (main_moco.py --aug)
    aug: str = "cifar10"


CIFAR10 = Config(
    train_per_class=500,
    val_per_class=100,
    input_size=32,
    batch_size=128,
    lr=0.06,
    moco_k=1024,
    budget_s=540,
    max_epochs=20,
)
# the generated fallback: 8 classes drawn at the input size. MoCo v1's strong hue jitter
# takes away the colours (random, and the easiest cue), its crops keep most of a shape
SHAPES = replace(CIFAR10, aug="v1")
# --quick: the same pipeline at toy size, for a smoke test
QUICK = Config(
    train_per_class=8,
    val_per_class=4,
    input_size=16,
    batch_size=16,
    lr=0.06,
    moco_k=64,
    # its sizes, not the budget, bound it: one epoch over 8 images of each class
    budget_s=300,
    max_epochs=1,
    max_per_class=8,
    probe_epochs=2,
    speed_steps=2,
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
        "--budget",
        default=None,
        type=float,
        metavar="S",
        help=f"seconds the whole demo aims at (default: {CIFAR10.budget_s:g}); the "
        "pretraining is sized to the time the rest leaves, at the speed measured here",
    )
    parser.add_argument(
        "--epochs",
        default=None,
        type=int,
        metavar="N",
        help="pretrain N epochs on the evaluation set's training images instead of "
        "sizing the pretraining to --budget",
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


def link_images(source, out, per_class, classes=None):
    """
    OUT/<class>/: the first `per_class` images of each class folder of `source`
    (sorted by name), linked where the file system allows, else copied. Returns the
    classes.
    """
    classes = classes or sorted(os.listdir(source))
    for c in classes:
        src, dst = os.path.join(source, c), os.path.join(out, c)
        os.makedirs(dst)
        names = sorted(os.listdir(src))[:per_class]
        if len(names) < per_class:
            raise UsageError(
                f"{src!r} holds {len(names)} images; the demo takes {per_class} of "
                "each class"
            )
        for name in names:
            target = os.path.join(dst, name)
            try:
                os.symlink(os.path.abspath(os.path.join(src, name)), target)
            except OSError:
                shutil.copyfile(os.path.join(src, name), target)
    return classes


def take_subset(source, out, train_per_class, val_per_class):
    """OUT/{train,val}/<class>/: the first images of each class of `source`."""
    classes = link_images(
        os.path.join(source, "train"), os.path.join(out, "train"), train_per_class
    )
    link_images(
        os.path.join(source, "val"), os.path.join(out, "val"), val_per_class, classes
    )
    return classes


def prepare_data(args, config, data):
    """
    OUT/data from CIFAR-10, or from generated shapes; returns (name, classes, the
    folder of training images per class that pretraining may take from).
    """
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
        return "CIFAR-10", classes, os.path.join(root, "train")
    logger.info(f"=> CIFAR-10 not used ({how}): the generated shapes dataset instead")
    shapes.make_shapes(
        data, config.train_per_class, config.val_per_class, config.input_size, args.seed
    )
    return "shapes", list(shapes.CLASSES), os.path.join(data, "train")


def records(output_dir, kind):
    """The records of `kind` in OUTPUT_DIR/log.jsonl."""
    log = read_log(os.path.join(output_dir, "log.jsonl"))
    return [r for r in log if r.get("kind") == kind]


def plan_pretraining(
    images_per_s, seconds, classes, available_per_class, batch_size, max_epochs
):
    """
    (images per class, epochs) of the pretraining that fits in `seconds` at
    `images_per_s`: one epoch over as many images as fit, up to all available; with
    time for more, more epochs over all of them, up to max_epochs. At least one batch.
    """
    images = int(images_per_s * max(seconds, 0.0))
    available = available_per_class * classes
    if images >= available:
        return available_per_class, max(1, min(max_epochs, images // available))
    per_class = max(images // classes, math.ceil(batch_size / classes))
    return min(per_class, available_per_class), 1


class Demo:
    """The steps of one run: what they share, and the figures they give."""

    def __init__(self, config, output_dir, common):
        self.config = config
        self.output_dir = output_dir
        self.common = common
        self.recipe = [
            *("--aug", config.aug, "--bn-splits", "8", "--wd", "5e-4", "--cos"),
            *("--moco-m", "0.99", "--moco-t", "0.1"),
            *("-b", str(config.batch_size), "--lr", str(config.lr)),
            *("--moco-k", str(config.moco_k)),
        ]

    def path(self, *names):
        return os.path.join(self.output_dir, *names)

    def evaluate(self, title, out, pretrained=None):
        """kNN and linear-probe accuracy of one encoder, on features extracted once."""
        argv = [
            self.path("data"),
            *self.common,
            *("--cached-features", "--knn", "-b", "256"),
            *(
                "--epochs",
                str(self.config.probe_epochs),
                "--output-dir",
                self.path(out),
            ),
            *(("--pretrained", pretrained) if pretrained else ()),
        ]
        linear = run_step(title, main_lincls, argv)
        knn = records(self.path(out), "knn")[-1]["knn_acc1"]
        return {"knn": knn, "linear": linear}

    def measure_speed(self, pool, classes):
        """Images per second of pretraining over the first steps (the first not counted)."""
        steps = self.config.speed_steps
        per_class = math.ceil(steps * self.config.batch_size / len(classes))
        link_images(pool, self.path("speed", "data", "train"), per_class, classes)
        out = self.path("speed")
        run_step(
            f"pretraining speed: {steps} steps of main_moco.py",
            main_moco,
            [
                self.path("speed", "data"),
                *self.common,
                *self.recipe,
                *("--epochs", "1", "-p", "1", "--output-dir", out),
            ],
        )
        # only the speed was wanted
        os.remove(os.path.join(out, "checkpoint_0000.pth.tar"))
        speeds = [r["images_per_s"] for r in records(out, "step") if r["step"] >= 1]
        # images over seconds: the harmonic mean of the steps' speeds
        return len(speeds) / sum(1 / v for v in speeds)


def run_demo(args, config=None):
    """
    The whole demo; returns {encoder: {protocol: accuracy}} and the plot's path.
    config: the sizes (default: CIFAR10's, or SHAPES' when the shapes are drawn).
    """
    setup_logging()
    start = time.time()
    output_dir = args.output_dir
    prepare_output_dir(output_dir)
    data = os.path.join(output_dir, "data")
    name, classes, pool = prepare_data(args, config or CIFAR10, data)
    if config is None:
        config = CIFAR10 if name == "CIFAR-10" else SHAPES
    if args.budget is not None:
        config = replace(config, budget_s=args.budget)
    n_train = config.train_per_class * len(classes)
    n_val = config.val_per_class * len(classes)
    logger.info(
        f"=> dataset: {name}, {n_train} training and {n_val} held-out images, "
        f"{len(classes)} classes ({', '.join(classes)}), in {data} "
        f"({time.time() - start:.1f} s)"
    )
    common = [
        *("-a", "resnet18", "--small-stem", "--input-size", str(config.input_size)),
        *("--normalize", "cifar10", "-j", str(args.workers), "--seed", str(args.seed)),
    ]
    demo = Demo(config, output_dir, common)

    results = {}
    began = time.time()
    results["random"] = demo.evaluate(
        "kNN and linear probe of a randomly initialised encoder", "linear-random"
    )
    evaluation_s = time.time() - began

    if args.epochs is None:
        speed = demo.measure_speed(pool, classes)
        # the second evaluation takes as long as the first; RESERVE_S for the rest
        seconds = config.budget_s - (time.time() - start) - evaluation_s - RESERVE_S
        per_class, epochs = plan_pretraining(
            speed * SPEED_MARGIN,
            seconds,
            len(classes),
            min(len(os.listdir(os.path.join(pool, classes[0]))), config.max_per_class),
            config.batch_size,
            config.max_epochs,
        )
        logger.info(
            f"=> pretraining speed {speed:.1f} images/s; one evaluation took "
            f"{evaluation_s:.0f} s; {seconds:.0f} s left for pretraining in the "
            f"budget of {config.budget_s:g} s, planned at {SPEED_MARGIN:.0%} of that "
            f"speed: {per_class * len(classes)} images ({per_class} of each class), "
            f"{epochs} epoch(s)"
        )
    else:
        per_class, epochs = config.train_per_class, args.epochs
        logger.info(f"=> --epochs {epochs}: pretraining on the {n_train} images")
    link_images(pool, demo.path("pretrain-data", "train"), per_class, classes)
    steps = per_class * len(classes) // config.batch_size
    began = time.time()
    run_step(
        f"MoCo pretraining (the official CIFAR-10 demo's recipe, {config.aug} "
        "augmentation)",
        main_moco,
        [
            demo.path("pretrain-data"),
            *common,
            *demo.recipe,
            *("--epochs", str(epochs), "-p", str(max(1, steps * epochs // 100))),
            *("--output-dir", demo.path("pretrain")),
        ],
    )
    pretraining = {
        "images": per_class * len(classes),
        "epochs": epochs,
        "steps": steps * epochs,
        "seconds": time.time() - began,
    }
    pretraining["loss"] = loss_summary(
        [r["loss"] for r in records(demo.path("pretrain"), "step")], config.moco_k
    )
    pretrained = demo.path("pretrain", f"checkpoint_{epochs - 1:04d}.pth.tar")
    results["moco"] = demo.evaluate(
        "kNN and linear probe of the MoCo encoder", "linear-moco", pretrained
    )

    references = {
        "random init (backbone)": results["random"]["knn"],
        "MoCo, end (backbone)": results["moco"]["knn"],
    }
    plot = save_plot(demo.path("pretrain"), demo.path("curves.png"), references)
    table = format_table(results, name, n_train, n_val, config, pretraining)
    logger.info("\n" + table)
    if plot:
        logger.info(f"=> plot of the run: {plot}")
    logger.info(f"=> total time {time.time() - start:.0f} s")
    return results, plot


def loss_summary(losses, moco_k):
    """
    A line on the logged step losses: where they end against chance, ln(K + 1), and
    whether the last quarter of them falls below the quarter before it.
    """
    chance = math.log(moco_k + 1)
    if len(losses) < 4:
        return f"contrastive loss: {len(losses)} step(s) logged, chance {chance:.2f}"
    q = len(losses) // 4
    before, last = losses[-2 * q : -q], losses[-q:]
    trend = "falling" if sum(last) / q < sum(before) / q else "not falling"
    return (
        f"contrastive loss: {losses[0]:.2f} at the first logged step, "
        f"{sum(last) / q:.2f} over the last {q} logged steps, against "
        f"ln(K+1) = {chance:.2f} at chance; {trend} at the end (the last quarter's "
        f"mean against the quarter's before it, {sum(before) / q:.2f})"
    )


def save_plot(pretrain_dir, out, references):
    """The run's curves, or None with a hint when matplotlib is missing."""
    try:
        return plot_log(pretrain_dir, out, references=references)
    # matplotlib is optional
    except UsageError as e:
        logger.info(f"=> no plot: {e}")
        return None


def format_table(results, name, n_train, n_val, config, pretraining):
    """The demo's table, with what was run."""
    num_classes = n_val // config.val_per_class
    rows = [
        ("encoder", "kNN acc@1", "linear acc@1"),
        *(
            (label, *(f"{results[e][p]:.1f}" for p in ("knn", "linear")))
            for label, e in (("random init", "random"), ("MoCo", "moco"))
        ),
    ]
    lines = [f"{a:<12} {b:>10} {c:>13}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    p = pretraining
    title = (
        f"accuracy (%) on {n_val} held-out images of {name}, {num_classes} classes "
        f"(chance {100 / num_classes:.1f}); both encoders on the same backbone "
        f"features of {n_train} training images: kNN k 200, and the linear probe of "
        f"main_lincls.py --cached-features ({config.probe_epochs} epochs, lr "
        f"{main_lincls.probe.PROBE_LR:g}, standardised features)"
    )
    run = (
        f"MoCo: pretrained on {p['images']} images, {p['epochs']} epoch(s), "
        f"{p['steps']} steps of {config.batch_size}, K {config.moco_k}, "
        f"{p['seconds']:.0f} s"
    )
    return "\n".join([title, *lines, run, p["loss"]])


def main(args):
    given = {"--epochs": args.epochs, "--budget": args.budget}
    check_ranges(
        positive={k: v for k, v in given.items() if v is not None},
        non_negative={"-j/--workers": args.workers},
    )
    return run_demo(args, QUICK if args.quick else None)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
