#!/usr/bin/env python
"""
Fine-tune a MoCo ResNet-50 for detection with torchvision's Faster R-CNN R50-FPN, on
Pascal VOC (07+12 trainval, tested on 07 test) or COCO, and score it with pycocotools:

    python detection/train_torchvision.py --pretrained checkpoint_0199.pth.tar \
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed \
        --world-size 1 --rank 0 [folder holding VOCdevkit/]

No detectron2 needed. Runs on one GPU, on several (as above, or torchrun) and on the
CPU; --resume auto continues a run where it stopped. See docs/detection.md.
"""

import argparse
import inspect
import math
import os
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN

# the repository root, so that this runs from the root and from inside detection/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detection import datasets  # noqa: E402
from detection.detector import (  # noqa: E402
    ARCH,
    build_detector,
    learning_rate,
    load_backbone,
    parameter_groups,
    precise_bn,
    read_resnet50,
    sync_batchnorm,
)
from detection.evaluate import METRICS, evaluate, require_pycocotools  # noqa: E402
from moco.checkpoint import (  # noqa: E402
    CheckpointError,
    check_output_dir,
    load_checkpoint,
    save_atomically,
)
from moco.cli import (  # noqa: E402
    add_launch_arguments,
    check_ranges,
    launch_settings,
    run_cli,  # noqa: E402
)
from moco.data import EpochSampler, sample_seed  # noqa: E402
from moco.distributed import (  # noqa: E402
    PREEMPTED_EXIT_CODE,
    StopSignal,
    all_reduce_sum,
    barrier,
    cleanup,
    ignore_stop_signals,
    init_distributed,
    launch,
    shared_seed,
)
from moco.meters import JsonLogger  # noqa: E402
from moco.utils import (  # noqa: E402
    NonFiniteLossError,
    UsageError,
    logger,
    seed_everything,
)

CHECKPOINT = "checkpoint.pth.tar"
# the paper's detectron2 recipes (detection/configs): iterations, lr steps, warm-up
# iterations, shorter sides in training (a random one per image; testing uses the
# last, detectron2's MIN_SIZE_TEST 800)
SCHEDULES = {
    "voc": (24000, (18000, 22000), 100, tuple(range(480, 801, 32))),
    "coco": (180000, (120000, 160000), 1000, tuple(range(640, 801, 32))),
}
# FasterRCNN's options that --min-size and --max-size set
FIXED_OPTIONS = {"min_size", "max_size"}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Fine-tune a MoCo ResNet-50 with torchvision's Faster R-CNN "
        "R50-FPN on Pascal VOC or COCO; AP with pycocotools"
    )
    parser.add_argument(
        "data",
        metavar="DIR",
        help="VOC: the folder holding VOCdevkit/ (VOC2007, VOC2012); COCO: the folder "
        "holding annotations/ and the image folders (train2017, val2017)",
    )
    parser.add_argument("--dataset", default="voc", choices=datasets.DATASETS)
    parser.add_argument(
        "--train-sets",
        nargs="+",
        metavar="SPLIT",
        help="training splits (default: VOC 2007-trainval 2012-trainval; COCO "
        "train2017)",
    )
    parser.add_argument(
        "--test-set",
        metavar="SPLIT",
        help="the split AP is measured on (default: VOC 2007-test; COCO val2017)",
    )
    parser.add_argument(
        "--pretrained",
        default="",
        metavar="PATH",
        help="MoCo checkpoint whose ResNet-50 initialises the backbone (any flavour "
        "the detectron2 converter reads)",
    )
    parser.add_argument(
        "-b",
        "--batch-size",
        default=16,
        type=int,
        metavar="N",
        help="images per iteration of the node, split over its processes (default: "
        "16, the paper's on one node)",
    )
    parser.add_argument(
        "-j",
        "--workers",
        default=16,
        type=int,
        metavar="N",
        help="data loading workers of the node (default: 16)",
    )
    parser.add_argument(
        "--lr",
        default=0.02,
        type=float,
        help="learning rate (default: 0.02, the paper's for 16 images)",
    )
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument(
        "--wd",
        "--weight-decay",
        default=1e-4,
        type=float,
        dest="weight_decay",
        help="weight decay, none on BatchNorm (default: 1e-4)",
    )
    parser.add_argument(
        "--iters",
        type=int,
        help="training iterations (default: VOC 24000, COCO 180000)",
    )
    parser.add_argument(
        "--steps",
        nargs="*",
        type=int,
        help="iterations at which lr drops 10x (default: VOC 18000 22000, COCO "
        "120000 160000)",
    )
    parser.add_argument(
        "--warmup-iters",
        type=int,
        help="iterations of linear warm-up from lr/1000 (default: VOC 100, COCO 1000)",
    )
    parser.add_argument(
        "--min-size",
        nargs="+",
        type=int,
        metavar="PX",
        help="shorter side in training, one drawn per image; testing uses the last "
        "(default: VOC 480 512 ... 800, COCO 640 672 ... 800)",
    )
    parser.add_argument(
        "--max-size",
        default=1333,
        type=int,
        metavar="PX",
        help="longer side at most (default: 1333)",
    )
    parser.add_argument(
        "--precise-bn",
        default=200,
        type=int,
        metavar="N",
        help="re-estimate BatchNorm statistics on N training batches before each "
        "evaluation, as the paper's configs (default: 200; 0: off)",
    )
    parser.add_argument(
        "--eval-freq",
        default=0,
        type=int,
        metavar="N",
        help="also evaluate every N iterations (default: 0, at the end only)",
    )
    parser.add_argument(
        "--save-freq",
        default=1000,
        type=int,
        metavar="N",
        help="checkpoint every N iterations (default: 1000); also at the end and on "
        "SIGTERM/SIGUSR1",
    )
    parser.add_argument(
        "--detector-opt",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="options of torchvision's FasterRCNN, e.g. rpn_post_nms_top_n_train=1000 "
        "box_batch_size_per_image=256",
    )
    parser.add_argument(
        "--resume",
        default="",
        metavar="PATH",
        help=f"a checkpoint of this script, or 'auto' for --output-dir/{CHECKPOINT} "
        "if there is one",
    )
    parser.add_argument(
        "-e",
        "--evaluate",
        action="store_true",
        help="only evaluate the detector of --resume",
    )
    parser.add_argument(
        "--output-dir",
        default=".",
        metavar="DIR",
        help="where the checkpoint and log.jsonl go (default: the current folder)",
    )
    parser.add_argument("--seed", default=None, type=int, help="makes a run repeatable")
    parser.add_argument(
        "-p", "--print-freq", default=20, type=int, metavar="N", help="(default: 20)"
    )
    add_launch_arguments(parser)
    return parser


def with_defaults(args):
    """args with the dataset's defaults for the options left unset."""
    iters, steps, warmup, min_size = SCHEDULES[args.dataset]
    train_sets, test_set = datasets.DEFAULT_SPLITS[args.dataset]
    given = vars(args)
    defaults = {
        "train_sets": list(train_sets),
        "test_set": test_set,
        "iters": iters,
        "steps": list(steps),
        "warmup_iters": warmup,
        "min_size": list(min_size),
    }
    return argparse.Namespace(
        **{**given, **{k: v for k, v in defaults.items() if given[k] is None}}
    )


def detector_options(args) -> dict:
    """FasterRCNN's keyword arguments: sizes, and --detector-opt KEY=VALUE."""
    # the numbers among FasterRCNN's options (thresholds, counts), sizes set apart
    known = {
        name: p.default
        for name, p in inspect.signature(FasterRCNN.__init__).parameters.items()
        if type(p.default) in (int, float) and name not in FIXED_OPTIONS
    }
    options = {}
    for item in args.detector_opt:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise UsageError(
                f"--detector-opt {item!r}: expected KEY=VALUE with KEY a numeric "
                "option of torchvision's FasterRCNN: " + ", ".join(sorted(known))
            )
        try:
            options[key] = type(known[key])(value)
        except ValueError:
            kind = "an integer" if type(known[key]) is int else "a number"
            raise UsageError(f"--detector-opt {item!r}: {key} takes {kind}") from None
    # torchvision's transform resizes training images to a random one of min_size,
    # test images to its last
    options["min_size"] = tuple(args.min_size)
    options["max_size"] = args.max_size
    return options


def check_args(args):
    """Refuse impossible settings with one line each, before any process starts."""
    check_ranges(
        positive={
            "-b/--batch-size": args.batch_size,
            "--lr": args.lr,
            "--iters": args.iters,
            "--max-size": args.max_size,
            "-p/--print-freq": args.print_freq,
            "--min-size": min(args.min_size),
        },
        non_negative={
            "-j/--workers": args.workers,
            "--wd": args.weight_decay,
            "--warmup-iters": args.warmup_iters,
            "--precise-bn": args.precise_bn,
            "--eval-freq": args.eval_freq,
            "--save-freq": args.save_freq,
        },
    )
    if list(args.steps) != sorted(args.steps):
        raise UsageError(f"--steps must increase, got {args.steps}")
    detector_options(args)
    launch_settings(args).check(args.batch_size)
    require_pycocotools()
    splits = [args.test_set] if args.evaluate else [*args.train_sets, args.test_set]
    datasets.check_layout(args.dataset, args.data, splits)
    check_output_dir(args.output_dir)
    path = resume_path(args)
    if path:
        read_resume(path, args)
    elif args.evaluate:
        raise UsageError(
            "--evaluate scores a trained detector: give --resume FILE (a checkpoint "
            "of this script)"
        )
    elif not args.pretrained:
        raise UsageError(
            "give --pretrained FILE, the MoCo checkpoint whose ResNet-50 starts the "
            "backbone"
        )
    else:
        read_resnet50(args.pretrained)


def resume_path(args) -> str | None:
    """The checkpoint --resume names ('auto': the output folder's, if any), or None."""
    if args.resume == "auto":
        path = os.path.join(args.output_dir, CHECKPOINT)
        return path if os.path.isfile(path) else None
    return args.resume or None


def read_resume(path, args) -> dict:
    """The contents of a checkpoint of this script for this dataset, else one line."""
    state = load_checkpoint(path, what="--resume checkpoint")
    if not (isinstance(state, dict) and state.get("arch") == ARCH and "iter" in state):
        raise CheckpointError(
            f"--resume {path!r} is not a checkpoint of {os.path.basename(__file__)} "
            "(a MoCo checkpoint goes to --pretrained)"
        )
    if state.get("dataset") != args.dataset:
        raise CheckpointError(
            f"--resume {path!r} is a detector for {state.get('dataset')!r}, not "
            f"--dataset {args.dataset}"
        )
    return state


def main(args):
    args = with_defaults(args)
    check_args(args)
    return launch(main_worker, launch_settings(args), args)


def main_worker(local_rank, procs_per_node, args):
    env = init_distributed(local_rank, procs_per_node, launch_settings(args))
    try:
        return run(env, args)
    finally:
        cleanup()


def run(env, args):
    """Fine-tune and evaluate in this process; returns the last evaluation."""
    batch_size, workers = env.per_process(args.batch_size, args.workers)
    seed_everything(args.seed)
    # images of many sizes: cudnn's search per size would cost more than it saves
    torch.backends.cudnn.benchmark = False
    test_set = datasets.DetectionSet(args.dataset, args.data, [args.test_set], False)
    num_classes = len(test_set.classes) + 1

    logger.info(f"=> creating model '{ARCH}' ({num_classes - 1} classes)")
    model = build_detector(num_classes, **detector_options(args))
    path = resume_path(args)
    state = read_resume(path, args) if path else None
    if state:
        if state.get("classes") != list(test_set.classes):
            raise CheckpointError(
                f"--resume {path!r} detects {len(state.get('classes', []))} classes, "
                f"not the {num_classes - 1} of {args.test_set}"
            )
        model.load_state_dict(state["state_dict"])
        logger.info(f"=> loaded checkpoint '{path}' (iteration {state['iter']})")
    else:
        n = load_backbone(model, read_resnet50(args.pretrained), args.pretrained)
        logger.info(
            f"=> backbone: all {n} tensors of the ResNet-50 in '{args.pretrained}' "
            "loaded and checked; the FPN and heads start random"
        )
    sync_bn = sync_batchnorm(model, env.distributed, env.device)
    model.to(env.device)
    model_ddp = model
    if env.distributed:
        model_ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None
        )
    optimizer = torch.optim.SGD(
        parameter_groups(model, args.weight_decay), args.lr, momentum=args.momentum
    )
    if state:
        optimizer.load_state_dict(state["optimizer"])
    log = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), env.is_main)

    if args.evaluate:
        stats = evaluate(model, test_set, env, workers)
        report(stats, state["iter"], args, log)
        return stats

    log.log({"kind": "args", **vars(args)})
    train_set = datasets.DetectionSet(args.dataset, args.data, args.train_sets, True)
    data_seed = state["data_seed"] if state else shared_seed(args.seed)
    print_summary(args, env, batch_size, len(train_set), len(test_set), sync_bn)
    job = Run(env, args, model, model_ddp, optimizer, (train_set, test_set), log)
    return job.train(state["iter"] if state else 0, batch_size, workers, data_seed)


class Run:
    """A fine-tuning run: its loop, checkpoints and evaluations."""

    def __init__(self, env, args, model, model_ddp, optimizer, data, log):
        self.env, self.args = env, args
        self.model, self.model_ddp, self.optimizer = model, model_ddp, optimizer
        self.train_set, self.test_set = data
        self.log = log
        # the seed of the samples' flips and of each iteration's draws
        self.data_seed = 0

    def loader(self, batch_size, workers):
        """The training images, this process's share, in a resumable order."""
        sampler = EpochSampler(
            self.train_set, self.env.world_size, self.env.rank, data_seed=self.data_seed
        )
        return DataLoader(
            self.train_set,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=datasets.collate,
            pin_memory=self.env.device.type == "cuda",
            drop_last=True,
            generator=torch.Generator(),
            worker_init_fn=ignore_stop_signals,
        )

    def batches(self, loader, start):
        """Batches without end from iteration `start`, epoch after epoch."""
        per_epoch = len(loader.sampler) // loader.batch_size
        epoch, step = divmod(start, per_epoch)
        while True:
            loader.sampler.set_epoch(epoch, start=step * loader.batch_size)
            yield from loader
            epoch, step = epoch + 1, 0

    def seed(self, it):
        """
        Seed torch for iteration `it` of this process: the detector's random draws
        (training scales, RPN and ROI samples) then do not depend on where a run was
        resumed.
        """
        torch.manual_seed(sample_seed(self.data_seed, it, self.env.rank))

    def train(self, start, batch_size, workers, data_seed):
        """Iterations `start` to --iters; returns the last evaluation's figures."""
        args, env = self.args, self.env
        self.data_seed = data_seed
        loader = self.loader(batch_size, workers)
        if len(loader) == 0:
            raise UsageError(
                f"{len(self.train_set)} training images give no batch of {batch_size} "
                f"per process ({env.world_size} processes); use a smaller -b"
            )
        batches = self.batches(loader, start)
        stop = StopSignal()
        stats = None
        try:
            self.model_ddp.train()
            last_log = (start, time.time())
            for it in range(start, args.iters):
                lr = learning_rate(it, args.lr, args.steps, args.warmup_iters)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.seed(it)
                images, targets = next(batches)
                losses, stopping = self.step(
                    images, targets, stop.received is not None, it
                )
                if it % args.print_freq == 0 or it + 1 == args.iters:
                    seconds = (time.time() - last_log[1]) / (it + 1 - last_log[0])
                    self.log_step(it, lr, losses, seconds)
                    last_log = (it + 1, time.time())
                stats = self.after_step(it + 1, stopping, batch_size, workers) or stats
            if start >= args.iters:  # resumed after the last iteration
                stats = self.evaluate(start, workers)
        finally:
            stop.restore()
        return stats

    def after_step(self, done, stopping, batch_size, workers):
        """
        After `done` iterations: BatchNorm statistics re-estimated before an
        evaluation, then the checkpoint (so that it holds them), then a stop on a
        signal, or the evaluation; returns its figures, or None.
        """
        args = self.args
        last = done == args.iters
        evaluating = last or (args.eval_freq and done % args.eval_freq == 0)
        if evaluating:
            self.precise_bn(done, batch_size, workers)
        if stopping or last or (args.save_freq and done % args.save_freq == 0):
            self.save(done)
        if stopping:
            logger.info(
                f"=> stopped by a signal after iteration {done}; resume with "
                f"--resume auto --output-dir {args.output_dir}"
            )
            # no process leaves before process 0 has written its checkpoint
            barrier()
            raise SystemExit(PREEMPTED_EXIT_CODE)
        if not evaluating:
            return None
        stats = self.evaluate(done, workers)
        self.model_ddp.train()
        return stats

    def step(self, images, targets, stop_requested, it):
        """One SGD step; returns (the losses averaged over processes, whether to stop)."""
        device = self.env.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets
        ]
        loss_dict = self.model_ddp(images, targets)
        loss = sum(loss_dict.values())
        # the step's one host read: every process's losses and stop flag, summed
        values = torch.stack(
            [loss.detach(), *(v.detach() for v in loss_dict.values())]
            + [torch.tensor(float(stop_requested), device=device)]
        )
        *sums, stops = all_reduce_sum(values).tolist()
        if not math.isfinite(sums[0]):
            raise NonFiniteLossError(
                f"the detector's loss became {sums[0]} at iteration {it}; stopped "
                f"without saving (the last checkpoint in {self.args.output_dir!r} is "
                "intact). Try a lower --lr"
            )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        n = self.env.world_size
        names = ["loss", *loss_dict]
        return {k: v / n for k, v in zip(names, sums)}, stops > 0

    def log_step(self, it, lr, losses, seconds):
        """The progress line of iteration `it` and its record; seconds per iteration."""
        parts = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        logger.info(
            f"iter: [{it}/{self.args.iters}] lr {lr:.6g} {parts} ({seconds:.3f} s/iter)"
        )
        record = {"kind": "step", "iter": it, "lr": lr, **losses, "s_per_iter": seconds}
        self.log.log(record)

    def precise_bn(self, done, batch_size, workers):
        """BatchNorm statistics of --precise-bn batches of the current epoch."""
        if not self.args.precise_bn:
            return
        loader = self.loader(batch_size, workers)
        per_epoch = len(loader.sampler) // batch_size
        self.seed(done)
        batches = self.batches(loader, (done // per_epoch) * per_epoch)
        precise_bn(self.model, batches, self.args.precise_bn, self.env.device)

    def save(self, done):
        """The checkpoint after `done` iterations, written whole or not at all."""
        if not self.env.is_main:
            return
        state = {
            "iter": done,
            "arch": ARCH,
            "dataset": self.args.dataset,
            "classes": list(self.test_set.classes),
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_seed": self.data_seed,
            "args": vars(self.args),
        }
        save_atomically(state, os.path.join(self.args.output_dir, CHECKPOINT))

    def evaluate(self, done, workers):
        """Evaluate, print and log; returns the figures."""
        stats = evaluate(self.model, self.test_set, self.env, workers)
        report(stats, done, self.args, self.log)
        return stats


def report(stats, done, args, log):
    """An evaluation's figures, printed and logged."""
    shown = " ".join(f"{k} {stats[k]:.2f}" for k in METRICS if k in stats)
    logger.info(
        f" * {args.dataset} {args.test_set} after {done} iterations: {shown} "
        f"({stats['images']} images)"
    )
    log.log({"kind": "eval", "iter": done, **stats})


def print_summary(args, env, batch_size, n_train, n_test, sync_bn):
    """The derived values, printed once."""
    global_batch = batch_size * env.world_size
    if sync_bn:
        bn = f"SyncBatchNorm over {env.world_size} processes"
    elif env.distributed:
        bn = "BatchNorm per process (SyncBatchNorm needs GPUs)"
    else:
        bn = "BatchNorm"
    lines = [
        f"processes: {env.world_size} ({env.procs_per_node} per node), device "
        f"{env.device}",
        f"batch: {batch_size} per process, {global_batch} global; {bn}, trained",
        f"learning rate: {args.lr:g} (linear scaling for this batch: "
        f"{0.02 * global_batch / 16:g} = 0.02 x {global_batch}/16), steps at "
        f"{args.steps}, {args.warmup_iters} warm-up iterations, {args.iters} "
        "iterations",
        f"data: {args.dataset} {'+'.join(args.train_sets)} ({n_train} images), "
        f"test {args.test_set} ({n_test} images); shorter side {args.min_size} in "
        f"training, {args.min_size[-1]} in testing, at most {args.max_size}",
        f"output: {os.path.abspath(args.output_dir)}",
    ]
    for line in lines:
        logger.info("=> " + line)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
