#!/usr/bin/env python
"""Linear classification on frozen MoCo features: the original's command line, anywhere.

    python main_lincls.py -a resnet50 --lr 30.0 --batch-size 256 \
      --pretrained [your checkpoint path]/checkpoint_0199.pth.tar \
      --dist-url 'tcp://localhost:10001' --multiprocessing-distributed \
      --world-size 1 --rank 0 [your imagenet-folder with train and val folders]

Also runs on one GPU, on the CPU and under torchrun (see README.md). The quick probe,
--cached-features, trains the same fc on features extracted once (moco/probe.py).
"""

import argparse
import copy
import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets.folder import find_classes

from moco import checkpoint as ckpt
from moco import probe
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
    require_labels,
)
from moco.distributed import (
    all_reduce_sum,
    cleanup,
    init_distributed,
    launch,
    shard_range,
    shared_seed,
)
from moco.knn import KnnOptions
from moco.loader import eval_transforms
from moco.meters import (
    AverageMeter,
    JsonLogger,
    ProgressMeter,
    TrainMeters,
    read_step,
)
from moco.models import build_encoder, check_arch
from moco.utils import UsageError, adjust_learning_rate, logger, seed_everything

HEAD_KEYS = ("fc.weight", "fc.bias")
ORIGINAL_LR = 30.0


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
    # --lr's default depends on the protocol: see learning_rate
    parser.set_defaults(epochs=100, lr=None, schedule=[60, 80], weight_decay=0.0)
    for action in parser._actions:
        if action.dest == "lr":
            action.help = (
                f"initial learning rate (default: {ORIGINAL_LR}, the original's; "
                f"{probe.PROBE_LR} with --cached-features)"
            )
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
    parser.add_argument(
        "--cached-features",
        action="store_true",
        help="the quick probe: extract the backbone's features of DIR/train and "
        "DIR/val once (validation transform, no augmentation), standardise them and "
        "train fc on them for --epochs; saves the original's checkpoint files",
    )
    parser.add_argument(
        "--knn",
        action="store_true",
        help="with --cached-features: also the weighted kNN accuracy of the same "
        "features (k 200, t 0.1: main_knn.py's classifier)",
    )
    add_launch_arguments(parser)
    add_image_arguments(parser)
    return parser


def learning_rate(args) -> float:
    """--lr, else its default: the original's 30, or PROBE_LR on cached features."""
    if args.lr is not None:
        return args.lr
    return probe.PROBE_LR if args.cached_features else ORIGINAL_LR


def check_args(args):
    """Refuse impossible settings with one line each, before any data is read."""
    if args.cached_features:
        for flag, given in (
            ("--resume", args.resume),
            ("--evaluate", args.evaluate),
            ("--start-epoch", args.start_epoch),
        ):
            if given:
                raise UsageError(
                    f"--cached-features trains in one run and takes no {flag}: "
                    "rerun it, or evaluate its checkpoint on the images with "
                    "--evaluate --resume FILE without --cached-features"
                )
    elif args.knn:
        raise UsageError("--knn measures cached features: add --cached-features")
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


def main(args):
    args = argparse.Namespace(**{**vars(args), "lr": learning_rate(args)})
    check_args(args)
    model = create_model(args, 1000)
    if args.pretrained:  # refuse a wrong file before reading any data
        ckpt.load_encoder(model, args.pretrained, args.arch)
    classes, _, _ = require_labels(args.data, "main_lincls.py (linear classification)")
    if args.resume:
        hint = f" with {len(classes)} classes"
        hint += " and --small-stem" if args.small_stem else ""
        model = create_model(args, len(classes))
        ckpt.check_classifier_resume(args.resume, args.arch, model, hint)
    return launch(main_worker, launch_settings(args), args)


def main_worker(local_rank, procs_per_node, args):
    env = init_distributed(local_rank, procs_per_node, launch_settings(args))
    try:
        return run(env, args)
    finally:
        cleanup()


def run(env, args):
    """Linear classification in this process: returns the best validation Acc@1."""
    batch_size, workers = env.per_process(args.batch_size, args.workers)
    seed_everything(args.seed)
    num_classes = len(find_classes(os.path.join(args.data, "train"))[0])

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
    model.to(env.device)
    if args.cached_features:
        return cached_probe(env, args, model, reference, batch_size, workers)
    model_ddp = model
    if env.distributed:
        model_ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None
        )

    # define loss function (criterion) and optimizer
    criterion = nn.CrossEntropyLoss().to(env.device)

    # optimize only the linear classifier
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert len(parameters) == 2  # fc.weight, fc.bias
    optimizer = torch.optim.SGD(
        parameters, args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    checkpointer = ckpt.ClassifierCheckpointer(
        args.output_dir, model, optimizer, arch=args.arch, enabled=env.is_main
    )

    # optionally resume from a checkpoint
    start_epoch, best_acc1 = args.start_epoch, 0.0
    if args.resume:
        logger.info(f"=> loading checkpoint '{args.resume}'")
        start_epoch, best_acc1 = checkpointer.resume(args.resume)
        logger.info(f"=> loaded checkpoint '{args.resume}' (epoch {start_epoch})")

    train_loader, val_loader = create_loaders(args, env, batch_size, workers)
    log = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), env.is_main)
    logger.info(
        f"=> processes: {env.world_size}, device {env.device}; batch: {batch_size} "
        f"per process, {batch_size * env.world_size} global; data: "
        f"{len(train_loader.dataset)} training and {len(val_loader.dataset.dataset)} "
        f"validation images, {num_classes} classes"
    )

    if args.evaluate:
        stats = validate(val_loader, model_ddp, criterion, args, env)
        log.log({"kind": "eval", **stats})
        return stats["val_acc1"]

    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        lr = adjust_learning_rate(optimizer, epoch, args.lr, args.epochs, args.schedule)

        # train for one epoch
        train_stats = train(
            train_loader, model_ddp, criterion, optimizer, epoch, args, env
        )

        # evaluate on validation set
        val_stats = validate(val_loader, model_ddp, criterion, args, env)

        # remember best acc@1 and save checkpoint
        acc1 = val_stats["val_acc1"]
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        checkpointer.save(epoch, best_acc1, is_best)
        if env.is_main and epoch == start_epoch:
            sanity_check(model.state_dict(), reference, args)
        log.log(
            {
                "kind": "epoch",
                "epoch": epoch,
                "lr": lr,
                **train_stats,
                **val_stats,
                "best_acc1": best_acc1,
            }
        )
    return best_acc1


def create_loaders(args, env, batch_size, workers):
    """
    The training loader (this process's share, a resumable order) and the validation
    loader (this process's contiguous share: every image counted once).
    """
    train_transform, val_transform = eval_transforms(args.input_size, args.normalize)
    data_seed = shared_seed(args.seed)
    train_dataset = SeededImageFolder(
        os.path.join(args.data, "train"),
        train_transform,
        data_seed=data_seed,
        skip_bad=args.skip_bad_images,
    )
    train_loader = DataLoader(
        train_dataset,
        batch_size=batch_size,
        sampler=EpochSampler(
            train_dataset, env.world_size, env.rank, data_seed=data_seed
        ),
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator(),
    )
    val_dataset = SeededImageFolder(os.path.join(args.data, "val"), val_transform)
    val_loader = DataLoader(
        Subset(val_dataset, shard_range(len(val_dataset), env.rank, env.world_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
    )
    return train_loader, val_loader


def train(train_loader, model, criterion, optimizer, epoch, args, env):
    """One epoch of the linear classifier; returns its mean loss and accuracies."""
    meters = TrainMeters(epoch, len(train_loader))

    # Under the protocol of linear classification on frozen features, no part of the
    # pretrained model may change: BatchNorm in train mode would update its running
    # statistics even without gradients, so the whole model runs in eval mode.
    model.eval()

    for i, (images, target) in enumerate(train_loader):
        # measure data loading time
        meters.loaded()
        images = images.to(env.device, non_blocking=True)
        target = target.to(env.device, non_blocking=True)

        # compute output
        output = model(images)
        loss = criterion(output, target)
        loss_value, acc1, acc5 = read_step(loss, output, target)

        # compute gradient and do SGD step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        # measure accuracy, loss and elapsed time
        meters.update(loss_value, acc1, acc5, images.size(0))
        if i % args.print_freq == 0:
            meters.progress.display(i)
    return {"loss": meters.losses.avg, "acc1": meters.top1.avg, "acc5": meters.top5.avg}


def validate(val_loader, model, criterion, args, env):
    """
    Accuracy over the whole validation set, every process's share summed: val_acc1,
    val_acc5, val_loss and val_images, the same on every process.
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
            loss_value, acc1, acc5 = read_step(loss, output, target)
            for meter, value in ((losses, loss_value), (top1, acc1), (top5, acc5)):
                meter.update(value, images.size(0))

            # measure elapsed time
            batch_time.update(time.time() - end)
            end = time.time()

            if i % args.print_freq == 0:
                progress.display(i)

    # the meters hold percentages of counts
    totals = torch.tensor(
        [round(top1.sum / 100), round(top5.sum / 100), losses.sum, losses.count],
        dtype=torch.float64,
        device=env.device,
    )
    return accuracy_report(totals)


def accuracy_report(totals, shown=True):
    """
    The validation figures from this process's [top-1 count, top-5 count, loss sum,
    images], summed over every process's: printed (if shown), and returned as
    validate does.
    """
    correct1, correct5, loss_sum, n = all_reduce_sum(totals).tolist()
    acc1, acc5 = 100.0 * correct1 / max(n, 1), 100.0 * correct5 / max(n, 1)
    if shown:
        logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({int(n)} images)")
    return {
        "val_acc1": acc1,
        "val_acc5": acc5,
        "val_loss": loss_sum / max(n, 1),
        "val_images": int(n),
    }


def cached_probe(env, args, model, reference, batch_size, workers):
    """
    --cached-features: fc trained on the backbone's features of every image, extracted
    once (moco/probe.py), with the report, log records and checkpoint files of the
    protocol on images. Returns the best validation Acc@1.
    """
    log = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), env.is_main)
    train_set, val = cached_features(env, args, model, batch_size, workers, log)
    mean, std = probe.feature_stats(train_set.x)
    train_set.x = probe.standardize_(train_set.x, mean, std)
    # trained on standardised features; the files get it folded (probe.fold)
    fc = copy.deepcopy(model.fc)
    optimizer = torch.optim.SGD(
        fc.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    generator = torch.Generator().manual_seed(shared_seed(args.seed))
    global_batch = batch_size * env.world_size
    best_acc1, best = 0.0, None
    for epoch in range(args.epochs):
        lr = adjust_learning_rate(optimizer, epoch, args.lr, args.epochs, args.schedule)
        train_stats = probe.train_epoch(
            fc, optimizer, train_set, global_batch, generator
        )
        shown = epoch % args.print_freq == 0 or epoch == args.epochs - 1
        if shown:
            logger.info(
                f"Epoch: [{epoch}] lr {lr:g} Loss {train_stats['loss']:.4e} Acc@1 "
                f"{train_stats['acc1']:6.2f} Acc@5 {train_stats['acc5']:6.2f} "
                "(training features)"
            )
        folded = probe.fold(fc, mean, std)
        val_stats = accuracy_report(probe.validation_sums(folded, val, env), shown)
        acc1 = val_stats["val_acc1"]
        if acc1 > best_acc1:
            best = (epoch, folded.state_dict())
        best_acc1 = max(acc1, best_acc1)
        log.log(
            {
                "kind": "epoch",
                "epoch": epoch,
                "lr": lr,
                **train_stats,
                **val_stats,
                "best_acc1": best_acc1,
            }
        )
    if best is not None:
        logger.info(f" * best Acc@1 {best_acc1:.3f} (epoch {best[0]})")
    save_cached_probe(env, args, model, best, best_acc1, folded.state_dict())
    if env.is_main:
        sanity_check(model.state_dict(), reference, args)
    return best_acc1


def cached_features(env, args, model, batch_size, workers, log):
    """
    The backbone's features of DIR/train and DIR/val (probe.Features, all of them on
    every process), logged; with --knn, their kNN accuracy too.
    """
    # process 0's backbone and initial fc everywhere: without --seed the random
    # initialisations differ, and every process trains the same classifier
    probe.share_from_first_process(model)
    start = time.time()
    transform = eval_transforms(args.input_size, args.normalize)[1]
    train_set, val = probe.extract_splits(
        model, args.data, env, transform, batch_size, workers, args.skip_bad_images
    )
    record = {
        "kind": "features",
        "train_images": train_set.x.shape[0],
        "val_images": val.x.shape[0],
        "dim": train_set.x.shape[1],
        "seconds": time.time() - start,
    }
    log.log(record)
    logger.info(
        f"=> cached features: {record['train_images']} training and "
        f"{record['val_images']} validation images, {record['dim']}-d, extracted in "
        f"{record['seconds']:.1f} s by {env.world_size} process(es), device "
        f"{env.device}; standardised; fc trained in batches of "
        f"{batch_size * env.world_size}, lr {args.lr:g}"
    )
    if args.knn:
        options = KnnOptions()
        num_classes = model.fc.out_features
        acc = probe.knn_accuracy(train_set, val, num_classes, env, options.k, options.t)
        logger.info(f" * kNN Acc@1 {acc:.2f} (k {options.k}, t {options.t})")
        log.log({"kind": "knn", "knn_acc1": acc, "k": options.k, "t": options.t})
    return train_set, val


def save_cached_probe(env, args, model, best, best_acc1, last_fc):
    """
    The original's files: model_best.pth.tar with the fc of the best epoch (`best`:
    its index and fc, or None), checkpoint.pth.tar with the last one (`last_fc`).
    The optimizer's momentum belongs to the standardised features: the files hold a
    fresh optimizer over model.fc.
    """
    optimizer = torch.optim.SGD(
        [model.fc.weight, model.fc.bias],
        args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    checkpointer = ckpt.ClassifierCheckpointer(
        args.output_dir, model, optimizer, arch=args.arch, enabled=env.is_main
    )
    last = args.epochs - 1
    if best is not None:
        model.fc.load_state_dict(best[1])
        checkpointer.save(best[0], best_acc1, is_best=True)
    if best is None or best[0] != last:
        model.fc.load_state_dict(last_fc)
        checkpointer.save(last, best_acc1, is_best=False)


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
