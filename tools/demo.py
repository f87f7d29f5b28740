"""MoCo v2 learning on the CPU in minutes: pretrain, then evaluate against random init.

    python -m tools.demo [--output-dir demo_output] [--epochs N] [--quick]

1. writes a dataset of shapes (tools/shapes.py) to OUTPUT/data;
2. pretrains a ResNet-18 with main_moco.py's main() (MoCo v2: --mlp --aug-plus --cos,
   small-image stem, 8-way split BatchNorm as 8 GPUs would), kNN monitor every 2 epochs;
3. evaluates the pretrained encoder and a randomly initialised one with main_knn.py
   and main_lincls.py (the linear probe on frozen features);
4. prints the table and plots the run to OUTPUT/curves.png (needs matplotlib).

Nothing here trains or evaluates by itself: every figure comes from the project's
scripts, called in-process with the arguments printed before each step.
"""

import argparse
import os
import shutil
import sys
import time

import main_knn
import main_lincls
import main_moco
from moco import checkpoint as ckpt
from moco.cli import run_cli
from moco.utils import UsageError, logger, setup_logging
from tools import shapes
from tools.plot import plot_log

MARKER = ".moco-demo"  # names a folder this demo made, and may empty again
PARTS = ("data", "pretrain", "linear-random", "linear-moco", "curves.png")

# the default run: about 4 minutes on 2 CPU cores
DEFAULT = dict(
    train_per_class=500, val_per_class=100, image_size=16, input_size=16,
    epochs=8, batch_size=128, lr=0.06, moco_k=2048, linear_epochs=5, knn_freq=2,
)  # fmt: skip
# --quick: the same pipeline at toy size, for a smoke test
QUICK = dict(
    train_per_class=8, val_per_class=4, image_size=16, input_size=16,
    epochs=1, batch_size=16, lr=0.06, moco_k=64, linear_epochs=1, knn_freq=1,
)  # fmt: skip


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="MoCo v2 on a generated dataset of shapes, on the CPU: pretraining, "
        "then kNN and linear accuracy against a randomly initialised encoder"
    )
    parser.add_argument(
        "--output-dir",
        default="demo_output",
        metavar="DIR",
        help="where the data, checkpoints, logs and plot go "
        "(default: demo_output; a previous demo run there is replaced)",
    )
    parser.add_argument(
        "--epochs",
        default=None,
        type=int,
        metavar="N",
        help=f"pretraining epochs (default: {DEFAULT['epochs']})",
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
        help="seed of the dataset, the weights and the augmentations",
    )
    parser.add_argument(
        "-j",
        "--workers",
        default=0,
        type=int,
        metavar="N",
        help="data loading worker processes (default: 0, in the main "
        "process: the fastest on 2 cores)",
    )
    # fmt: skip
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


def run_demo(output_dir, config, seed=0, workers=0):
    """The whole demo; returns {(encoder, protocol): accuracy} and the plot's path."""
    setup_logging()
    start = time.time()
    prepare_output_dir(output_dir)
    data = os.path.join(output_dir, "data")
    pretrain = os.path.join(output_dir, "pretrain")
    common = ["-a", "resnet18", "--small-stem", "--input-size", str(config["input_size"]),
              "-j", str(workers), "--seed", str(seed)]  # fmt: skip

    shapes.make_shapes(data, config["train_per_class"], config["val_per_class"],
                       config["image_size"], seed)  # fmt: skip
    n_train = config["train_per_class"] * len(shapes.CLASSES)
    n_val = config["val_per_class"] * len(shapes.CLASSES)
    logger.info(
        f"=> dataset: {n_train} training and {n_val} validation images of "
        f"{config['image_size']}px, {len(shapes.CLASSES)} shapes ({', '.join(shapes.CLASSES)}) "
        f"in {data} ({time.time() - start:.1f} s)"
    )

    results = {}
    results["random", "knn"] = run_step(
        "kNN accuracy of a randomly initialised encoder", main_knn,
        [data, *common, "-b", "256"],
    )  # fmt: skip
    bn_splits = 8 if config["batch_size"] % 8 == 0 else 1
    run_step(
        "MoCo v2 pretraining", main_moco,
        [data, *common, "--mlp", "--aug-plus", "--cos", "--epochs", str(config["epochs"]),
         "-b", str(config["batch_size"]), "--lr", str(config["lr"]), "--wd", "5e-4",
         "--moco-k", str(config["moco_k"]), "--moco-m", "0.99", "--moco-t", "0.2",
         "--bn-splits", str(bn_splits), "--knn-freq", str(config["knn_freq"]), "-p", "10",
         "--output-dir", pretrain],
    )  # fmt: skip
    pretrained = os.path.join(
        pretrain, f"checkpoint_{config['epochs'] - 1:04d}.pth.tar"
    )
    results["moco", "knn"] = run_step(
        "kNN accuracy of the MoCo encoder", main_knn,
        [data, *common, "-b", "256", "--pretrained", pretrained],
    )  # fmt: skip
    linear = [
        "--epochs",
        str(config["linear_epochs"]),
        "-b",
        "256",
        "--lr",
        "30",
        "--schedule",
        str(max(config["linear_epochs"] * 3 // 4, 1)),
        "-p",
        "100",
    ]
    results["random", "linear"] = run_step(
        "linear probe on the frozen random encoder", main_lincls,
        [data, *common, *linear, "--output-dir", os.path.join(output_dir, "linear-random")],
    )  # fmt: skip
    results["moco", "linear"] = run_step(
        "linear probe on the frozen MoCo encoder", main_lincls,
        [data, *common, *linear, "--pretrained", pretrained,
         "--output-dir", os.path.join(output_dir, "linear-moco")],
    )  # fmt: skip

    plot = save_plot(
        pretrain, os.path.join(output_dir, "curves.png"), results["random", "knn"]
    )
    logger.info("\n" + format_table(results, n_val))
    if plot:
        logger.info(f"=> plot of the run: {plot}")
    logger.info(f"=> total time {time.time() - start:.0f} s")
    return results, plot


def save_plot(pretrain_dir, out, random_knn):
    """The run's curves, or None with a hint when matplotlib is missing."""
    try:
        return plot_log(pretrain_dir, out, references={"random init": random_knn})
    except UsageError as e:  # matplotlib is optional
        logger.info(f"=> no plot: {e}")
        return None


def format_table(results, n_val):
    rows = [
        ("encoder", "kNN acc@1", "linear acc@1"),
        ("random init", *(f"{results['random', p]:.1f}" for p in ("knn", "linear"))),
        ("MoCo v2", *(f"{results['moco', p]:.1f}" for p in ("knn", "linear"))),
    ]
    lines = [f"{a:<12} {b:>10} {c:>13}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    chance = 100 / len(shapes.CLASSES)
    return "\n".join(
        [f"accuracy (%) on {n_val} held-out images, {len(shapes.CLASSES)} shapes "
         f"(chance {chance:.1f}):", *lines]
    )  # fmt: skip


def main(args):
    config = dict(QUICK if args.quick else DEFAULT)
    if args.epochs is not None:
        if args.epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {args.epochs}")
        config["epochs"] = args.epochs
    if args.workers < 0:
        raise UsageError(f"-j/--workers must be zero or positive, got {args.workers}")
    return run_demo(args.output_dir, config, args.seed, args.workers)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()) and 0)
