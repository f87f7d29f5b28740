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
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets.folder import find_classes

from moco import checkpoint as ckpt
from moco.cli import (
    add_data_arguments,
    add_image_arguments,
    add_launch_arguments,
    add_training_arguments,
    check_ranges,
    launch_settings,
    run_cli,
)
from moco.data import (
    EpochSampler,
    SeededImageFolder,
    check_image_folder,
    check_val_folder,
)
from moco.distributed import (
    all_reduce_sum,
    cleanup,
    init_distributed,
    launch,
    shard_range,
    shared_seed,
)
from moco.loader import eval_transforms
from moco.meters import AverageMeter, JsonLogger, ProgressMeter, record_step
from moco.models import build_encoder, check_arch
from moco.utils import UsageError, adjust_learning_rate, logger, seed_everything

HEAD_KEYS = ("fc.weight", "fc.bias")


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Linear classification on frozen features (ImageNet training)"
    )
    add_data_arguments(parser)
    add_training_arguments(
        parser,
        "path to a checkpoint of this script (default: none); without --pretrained "
        "the sanity check compares with its backbone",
    )
    parser.set_defaults(epochs=100, lr=30.0, schedule=[60, 80], weight_decay=0.0)
    parser.add_argument(
        "-e",
        "--evaluate",
        dest="evaluate",
        action="store_true",
        help="evaluate model on validation set",
    )
    parser.add_argument(
        "--pretrained",
        default="",
        type=str,
        help="path to moco pretrained checkpoint: this project's or the original's "
        "(module.encoder_q.*), a MoCo model saved without DDP (encoder_q.*), a MoCo v3 "
        "ResNet (module.base_encoder.*) or a torchvision state_dict",
    )
    add_launch_arguments(parser)
    add_image_arguments(parser)
    return parser


def check_args(args):
    """Refuse impossible settings with one line each, before any data is read."""
    check_ranges(
        positive={
            "--epochs": args.epochs,
            "-b/--batch-size": args.batch_size,
            "--input-size": args.input_size,
            "-p/--print-freq": args.print_freq,
            "--lr": args.lr,
        },
        non_negative={
            "-j/--workers": args.workers,
            "--start-epoch": args.start_epoch,
            "--wd": args.weight_decay,
        },
    )
    check_arch(args.arch, small_stem=args.small_stem)
    launch_settings(args).check(args.batch_size)
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
        create_model(args, num_classes).load_state_dict(ckpt.without_module_prefix(sd))
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UsageError(
            f"--resume {args.resume!r} does not fit -a {args.arch} with {num_classes} "
            f"classes{' and --small-stem' if args.small_stem else ''}: {detail[:200]}"
        ) from None


def main(args):
    check_args(args)
    model = create_model(args, 1000)
    if args.pretrained:  # refuse a wrong file before reading any data
        ckpt.load_encoder(model, args.pretrained, args.arch)
    classes, _ = check_image_folder(os.path.join(args.data, "train"), "training data")
    check_val_folder(args.data)
    check_resume(args, len(classes))
    return launch(main_worker, launch_settings(args), args)


def main_worker(local_rank, procs_per_node, args):
    env = init_distributed(local_rank, procs_per_node, launch_settings(args))
    try:
        return run(env, args)
    finally:
        cleanup()


def run(env, args):
    device = env.device
    batch_size, workers = env.per_process(args.batch_size, args.workers)
    seed_everything(args.seed)

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
        model.load_state_dict(ckpt.without_module_prefix(state["state_dict"]))
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_acc1 = state["epoch"], float(state["best_acc1"])
        logger.info(f"=> loaded checkpoint '{args.resume}' (epoch {start_epoch})")

    # Data loading code
    train_transform, val_transform = eval_transforms(args.input_size, args.normalize)
    data_seed = shared_seed(args.seed)
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
        lr = adjust_learning_rate(optimizer, epoch, args.lr, args.epochs, args.schedule)

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
                "state_dict": ckpt.with_module_prefix(model.state_dict()),
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
        record_step((losses, top1, top5), output, target, loss.item(), images.size(0))

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
            record_step(
                (losses, top1, top5), output, target, loss.item(), images.size(0)
            )

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
        for k, v in ckpt.without_module_prefix(state_dict).items()
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
