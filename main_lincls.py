#!/usr/bin/env python
"""Linear classification on frozen MoCo features: the original's command line, anywhere.

    python main_lincls.py -a resnet50 --lr 30.0 --batch-size 256 \
      --pretrained [your checkpoint path]/checkpoint_0199.pth.tar \
      --dist-url 'tcp://localhost:10001' --multiprocessing-distributed \
      --world-size 1 --rank 0 [your imagenet-folder with train and val folders]

Also runs on one GPU, on the CPU and under torchrun (see README.md).
"""

import argparse
import os
import random
import time

import numpy as np
import torch
import torch.backends.cudnn as cudnn
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets.folder import find_classes

from moco import checkpoint as ckpt
from moco.data import (
    EpochSampler,
    SeededImageFolder,
    check_image_folder,
    check_val_folder,
)
from moco.distributed import (
    all_reduce_sum,
    broadcast_object,
    check_launch_args,
    cleanup,
    init_distributed,
    launch,
    shard_range,
)
from moco.loader import eval_transforms
from moco.models import build_encoder, check_arch, model_names
from moco.utils import (
    AverageMeter,
    JsonLogger,
    ProgressMeter,
    UsageError,
    accuracy,
    adjust_learning_rate,
    logger,
    run_cli,
    setup_logging,
)

HEAD_KEYS = ("fc.weight", "fc.bias")


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Linear classification on frozen features (ImageNet training)"
    )
    # fmt: off
    parser.add_argument("data", metavar="DIR", help="path to dataset (DIR/train, DIR/val)")
    parser.add_argument(
        "-a", "--arch", metavar="ARCH", default="resnet50",
        help="model architecture, a torchvision classification model with an 'fc' layer: "
        + " | ".join(model_names()) + " (default: resnet50)",
    )
    parser.add_argument("-j", "--workers", default=32, type=int, metavar="N",
                        help="number of data loading workers of the node (default: 32)")
    parser.add_argument("--epochs", default=100, type=int, metavar="N",
                        help="number of total epochs to run")
    parser.add_argument("--start-epoch", default=0, type=int, metavar="N",
                        help="manual epoch number (useful on restarts)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="mini-batch size (default: 256), this is the total batch size "
                        "of all GPUs on the current node")
    parser.add_argument("--lr", "--learning-rate", default=30.0, type=float, metavar="LR",
                        help="initial learning rate", dest="lr")
    parser.add_argument("--schedule", default=[60, 80], nargs="*", type=int,
                        help="learning rate schedule (when to drop lr by 10x)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum")
    parser.add_argument("--wd", "--weight-decay", default=0.0, type=float, metavar="W",
                        help="weight decay (default: 0.)", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N",
                        help="print frequency (default: 10)")
    parser.add_argument("--resume", default="", type=str, metavar="PATH",
                        help="path to a checkpoint of this script (default: none); without "
                        "--pretrained the sanity check compares with its backbone")
    parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true",
                        help="evaluate model on validation set")
    parser.add_argument("--world-size", default=-1, type=int,
                        help="number of nodes for distributed training")
    parser.add_argument("--rank", default=-1, type=int,
                        help="node rank for distributed training")
    parser.add_argument("--dist-url", default="tcp://224.66.41.62:23456", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--dist-backend", default="nccl", type=str,
                        help="distributed backend (gloo is used where there is no GPU)")
    parser.add_argument("--seed", default=None, type=int,
                        help="seed for initializing training; makes a run reproducible")
    parser.add_argument("--gpu", default=None, type=int, help="GPU id to use.")
    parser.add_argument("--multiprocessing-distributed", action="store_true",
                        help="Use multi-processing distributed training to launch N processes "
                        "per node, which has N GPUs")
    parser.add_argument("--pretrained", default="", type=str,
                        help="path to moco pretrained checkpoint: this project's or the "
                        "original's (module.encoder_q.*), a MoCo model saved without DDP "
                        "(encoder_q.*), a MoCo v3 ResNet (module.base_encoder.*) or a "
                        "torchvision state_dict")

    # this project's additions
    extra = parser.add_argument_group("additions to the original")
    extra.add_argument("--output-dir", default=".", metavar="DIR",
                       help="where checkpoints and logs go (default: the current folder)")
    extra.add_argument("--input-size", default=224, type=int, metavar="PX",
                       help="crop size in pixels (default: 224)")
    extra.add_argument("--small-stem", action="store_true",
                       help="ResNet stem for small images (for encoders pretrained with it)")
    extra.add_argument("--procs-per-node", default=0, type=int, metavar="N",
                       help="processes per node with --multiprocessing-distributed "
                       "(default: one per GPU, or 1 without GPU)")
    extra.add_argument("--dist-timeout", default=1800, type=int, metavar="S",
                       help="seconds before a collective waiting on a dead process fails")
    extra.add_argument("--skip-bad-images", action="store_true",
                       help="log and skip unreadable training images instead of stopping "
                       "(validation images never: the accuracy stays exact)")
    # fmt: on
    return parser


def check_args(args):
    """Refuse impossible settings with one line each, before any data is read."""
    positive = {
        "--epochs": args.epochs,
        "-b/--batch-size": args.batch_size,
        "--input-size": args.input_size,
        "-p/--print-freq": args.print_freq,
    }
    for name, value in positive.items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    for name, value in {
        "-j/--workers": args.workers,
        "--start-epoch": args.start_epoch,
        "--wd": args.weight_decay,
    }.items():
        if value < 0:
            raise UsageError(f"{name} must be zero or positive, got {value}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    check_arch(args.arch, small_stem=args.small_stem)
    check_launch_args(args)
    ckpt.check_output_dir(args.output_dir)


def create_model(args, num_classes):
    """The original's linear classifier: a frozen encoder, fc re-initialised."""
    model = build_encoder(
        args.arch, num_classes=num_classes, small_stem=args.small_stem
    )
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise UsageError(
            f"the linear classifier needs an 'fc' layer; {args.arch} has none"
        )

    # freeze all layers but the last fc
    for name, param in model.named_parameters():
        if name not in HEAD_KEYS:
            param.requires_grad = False
    # init the fc layer
    with torch.no_grad():
        model.fc.weight.normal_(mean=0.0, std=0.01)
        model.fc.bias.zero_()
    return model


def check_resume(args, num_classes):
    """Refuse a --resume file that is not a linear classifier of this model."""
    if not args.resume:
        return
    state = ckpt.load_checkpoint(args.resume, what="--resume checkpoint")
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        problem = "no state_dict"
    else:
        missing = [k for k in ("epoch", "optimizer", "best_acc1") if k not in state]
        problem = f"no {missing[0]!r}" if missing else None
        if problem and any("encoder_q." in k for k in sd):
            problem += "; a pretraining checkpoint goes to --pretrained"
    if problem:
        raise UsageError(
            f"--resume {args.resume!r} is not a checkpoint of main_lincls.py ({problem})"
        )
    if state.get("arch", args.arch) != args.arch:
        raise UsageError(
            f"--resume {args.resume!r} is a {state['arch']} model; got -a {args.arch}"
        )
    try:
        create_model(args, num_classes).load_state_dict(strip_module(sd))
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UsageError(
            f"--resume {args.resume!r} does not fit -a {args.arch} with {num_classes} "
            f"classes{' and --small-stem' if args.small_stem else ''}: {detail[:200]}"
        ) from None


def strip_module(state_dict):
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def main(args):
    check_args(args)
    model = create_model(args, 1000)
    if args.pretrained:  # refuse a wrong file before reading any data
        ckpt.load_encoder(model, args.pretrained, args.arch)
    classes, _ = check_image_folder(os.path.join(args.data, "train"), "training data")
    check_val_folder(args.data)
    check_resume(args, len(classes))
    return launch(main_worker, args)


def main_worker(local_rank, procs_per_node, args):
    env = init_distributed(local_rank, procs_per_node, args)
    setup_logging(env.rank)
    try:
        return run(env, procs_per_node, args)
    finally:
        cleanup()


def run(env, procs_per_node, args):
    device = env.device
    batch_size = args.batch_size // procs_per_node  # -b is the node's batch
    workers = (args.workers + procs_per_node - 1) // procs_per_node

    if args.seed is not None:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    # determinism when a seed asks for it, else the fastest convolution algorithms
    cudnn.deterministic = args.seed is not None
    cudnn.benchmark = args.seed is None

    traindir = os.path.join(args.data, "train")
    valdir = os.path.join(args.data, "val")
    num_classes = len(find_classes(traindir)[0])

    # create model
    logger.info(f"=> creating model '{args.arch}'")
    model = create_model(args, num_classes)

    # load from pre-trained, before DistributedDataParallel constructor
    reference = None  # the backbone the sanity check compares with
    if args.pretrained:
        logger.info(f"=> loading checkpoint '{args.pretrained}'")
        ckpt.load_encoder(model, args.pretrained, args.arch)
        logger.info(f"=> loaded pre-trained model '{args.pretrained}'")
    elif not args.resume:
        reference = backbone_state(model.state_dict())
        logger.info(
            "=> no --pretrained: a randomly initialised backbone (the baseline)"
        )
    model.to(device)
    model_ddp = model
    if env.distributed:
        model_ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

    # define loss function (criterion) and optimizer
    criterion = nn.CrossEntropyLoss().to(device)

    # optimize only the linear classifier
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert len(parameters) == 2  # fc.weight, fc.bias
    optimizer = torch.optim.SGD(
        parameters, args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )

    # optionally resume from a checkpoint
    start_epoch, best_acc1 = args.start_epoch, 0.0
    if args.resume:
        logger.info(f"=> loading checkpoint '{args.resume}'")
        state = ckpt.load_checkpoint(
            args.resume, map_location=device, what="--resume checkpoint"
        )
        model.load_state_dict(strip_module(state["state_dict"]))
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_acc1 = state["epoch"], float(state["best_acc1"])
        logger.info(f"=> loaded checkpoint '{args.resume}' (epoch {start_epoch})")

    # Data loading code
    train_transform, val_transform = eval_transforms(args.input_size)
    data_seed = (
        args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    )
    data_seed = broadcast_object(data_seed)
    train_dataset = SeededImageFolder(
        traindir, train_transform, data_seed=data_seed, skip_bad=args.skip_bad_images
    )
    train_sampler = EpochSampler(
        train_dataset, env.world_size, env.rank, data_seed=data_seed
    )
    train_loader = DataLoader(
        train_dataset,
        batch_size=batch_size,
        sampler=train_sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )
    # each process validates its own share: every image counted once
    val_dataset = SeededImageFolder(valdir, val_transform)
    val_loader = DataLoader(
        Subset(val_dataset, shard_range(len(val_dataset), env.rank, env.world_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )

    log = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), env.is_main)
    logger.info(
        f"=> processes: {env.world_size}, device {device}; batch: {batch_size} per "
        f"process, {batch_size * env.world_size} global; data: {len(train_dataset)} "
        f"training and {len(val_dataset)} validation images, {num_classes} classes"
    )

    if args.evaluate:
        acc1, acc5, loss, n = validate(val_loader, model_ddp, criterion, args, env)
        log.log(
            {
                "kind": "eval",
                "val_acc1": acc1,
                "val_acc5": acc5,
                "val_loss": loss,
                "val_images": n,
            }
        )
        return acc1

    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        lr = adjust_learning_rate(optimizer, epoch, args)

        # train for one epoch
        train_stats = train(
            train_loader, model_ddp, criterion, optimizer, epoch, args, env
        )

        # evaluate on validation set
        acc1, acc5, loss, n = validate(val_loader, model_ddp, criterion, args, env)

        # remember best acc@1 and save checkpoint
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)

        if env.is_main:
            state = {
                "epoch": epoch + 1,
                "arch": args.arch,
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "best_acc1": best_acc1,
                "optimizer": optimizer.state_dict(),
            }
            save_checkpoint(state, is_best, args.output_dir)
            if epoch == start_epoch:
                sanity_check(model.state_dict(), reference, args)
        log.log(
            {
                "kind": "epoch",
                "epoch": epoch,
                "lr": lr,
                **train_stats,
                "val_acc1": acc1,
                "val_acc5": acc5,
                "val_loss": loss,
                "val_images": n,
                "best_acc1": best_acc1,
            }
        )
    return best_acc1


def train(train_loader, model, criterion, optimizer, epoch, args, env):
    batch_time = AverageMeter("Time", ":6.3f")
    data_time = AverageMeter("Data", ":6.3f")
    losses = AverageMeter("Loss", ":.4e")
    top1 = AverageMeter("Acc@1", ":6.2f")
    top5 = AverageMeter("Acc@5", ":6.2f")
    progress = ProgressMeter(
        len(train_loader),
        [batch_time, data_time, losses, top1, top5],
        prefix=f"Epoch: [{epoch}]",
    )

    # Under the protocol of linear classification on frozen features, no part of the
    # pretrained model may change: BatchNorm in train mode would update its running
    # statistics even without gradients, so the whole model runs in eval mode.
    model.eval()

    end = time.time()
    for i, (images, target) in enumerate(train_loader):
        # measure data loading time
        data_time.update(time.time() - end)

        images = images.to(env.device, non_blocking=True)
        target = target.to(env.device, non_blocking=True)

        # compute output
        output = model(images)
        loss = criterion(output, target)

        # measure accuracy and record loss
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss.item(), images.size(0))
        top1.update(acc1, images.size(0))
        top5.update(acc5, images.size(0))

        # compute gradient and do SGD step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        if i % args.print_freq == 0:
            progress.display(i)
    return {"loss": losses.avg, "acc1": top1.avg, "acc5": top5.avg}


def validate(val_loader, model, criterion, args, env):
    """Accuracy over the whole validation set, every process's share summed.

    Returns (acc1, acc5, loss, number of images), the same on every process.
    """
    batch_time = AverageMeter("Time", ":6.3f")
    losses = AverageMeter("Loss", ":.4e")
    top1 = AverageMeter("Acc@1", ":6.2f")
    top5 = AverageMeter("Acc@5", ":6.2f")
    progress = ProgressMeter(
        len(val_loader), [batch_time, losses, top1, top5], prefix="Test: "
    )

    # switch to evaluate mode
    model.eval()

    with torch.no_grad():
        end = time.time()
        for i, (images, target) in enumerate(val_loader):
            images = images.to(env.device, non_blocking=True)
            target = target.to(env.device, non_blocking=True)

            # compute output
            output = model(images)
            loss = criterion(output, target)

            # measure accuracy and record loss
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            losses.update(loss.item(), images.size(0))
            top1.update(acc1, images.size(0))
            top5.update(acc5, images.size(0))

            # measure elapsed time
            batch_time.update(time.time() - end)
            end = time.time()

            if i % args.print_freq == 0:
                progress.display(i)

    # this process's sums, then everyone's: the meters hold percentages of counts
    totals = torch.tensor(
        [round(top1.sum / 100), round(top5.sum / 100), losses.sum, losses.count],
        dtype=torch.float64,
        device=env.device,
    )
    correct1, correct5, loss_sum, n = all_reduce_sum(totals).tolist()
    acc1, acc5 = 100.0 * correct1 / max(n, 1), 100.0 * correct5 / max(n, 1)
    logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({int(n)} images)")
    return acc1, acc5, loss_sum / max(n, 1), int(n)


def save_checkpoint(state, is_best, output_dir):
    path = os.path.join(output_dir, "checkpoint.pth.tar")
    ckpt.save_checkpoint(state, path)
    if is_best:
        ckpt.copy_checkpoint(path, os.path.join(output_dir, "model_best.pth.tar"))


class SanityCheckError(RuntimeError):
    """A backbone tensor changed in linear classification: a bug, not a user error."""


def backbone_state(state_dict):
    """CPU copies of the tensors outside fc, without any 'module.' prefix."""
    return {
        k: v.detach().cpu().clone()
        for k, v in strip_module(state_dict).items()
        if k not in HEAD_KEYS
    }


def sanity_check(state_dict, reference, args):
    """
    Linear classifier should not change any weights other than the linear layer.
    This sanity check proves nothing wrong happened (e.g., BN stats updated): every
    backbone tensor equals the file's (--pretrained, else --resume) or, without a
    file, the random initialisation.
    """
    source = args.pretrained or args.resume or "the initial weights"
    if reference is None:
        logger.info(f"=> loading '{source}' for sanity check")
        obj = ckpt.load_checkpoint(source, what="sanity-check reference")
        reference, _ = ckpt.encoder_state_dict(obj, source)
    for k, v in backbone_state(state_dict).items():
        if k not in reference:
            if k.endswith("num_batches_tracked"):  # not in files of old torch versions
                continue
            raise SanityCheckError(f"{k} is not in {source!r}")
        if not torch.equal(v, reference[k].cpu()):
            raise SanityCheckError(
                f"{k} is changed in linear classifier training (compared with "
                f"{source!r})"
            )
    logger.info("=> sanity check passed.")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
