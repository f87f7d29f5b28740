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
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.datasets.folder import find_classes

from moco import checkpoint as ckpt
from moco import knn, probe
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
    cleanup,
    init_distributed,
    launch,
    shard_range,
    shared_seed,
)
from moco.features import Features
from moco.loader import eval_transforms
from moco.meters import (
    JsonLogger,
    TrainMeters,
    ValidationMeters,
    accuracy_report,
    epoch_record,
    read_step,
)
from moco.models import build_encoder, check_arch
from moco.utils import UsageError, adjust_learning_rate, logger, seed_everything
from moco.weights import encoder_state_dict, load_encoder

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
        lr_help=f"initial learning rate (default: {ORIGINAL_LR}, the original's; "
        f"{probe.PROBE_LR} with --cached-features)",
    )
    # --lr's default depends on the protocol: see learning_rate
    parser.set_defaults(epochs=100, lr=None, schedule=[60, 80], weight_decay=0.0)
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
        load_encoder(model, args.pretrained, args.arch)
    classes, _, _ = require_labels(args.data, "main_lincls.py (linear classification)")
    if args.resume:
        hint = f" with {len(classes)} classes"
        hint += " and --small-stem" if args.small_stem else ""
        model = create_model(args, len(classes))
        check_resume(args.resume, args.arch, model, hint)
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
        load_encoder(model, args.pretrained, args.arch)
        logger.info(f"=> loaded pre-trained model '{args.pretrained}'")
    elif not args.resume:
        reference = backbone_state(model.state_dict())
        logger.info(
            "=> no --pretrained: a randomly initialised backbone (the baseline)"
        )
    model.to(env.device)

    # optimize only the linear classifier
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert len(parameters) == 2  # fc.weight, fc.bias
    optimizer = torch.optim.SGD(
        parameters, args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    if args.cached_features:
        return cached_probe(env, args, model, optimizer, reference, batch_size, workers)
    model_ddp = model
    if env.distributed:
        model_ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None
        )

    # define loss function (criterion)
    criterion = nn.CrossEntropyLoss().to(env.device)

    # optionally resume from a checkpoint
    start_epoch, best_acc1 = args.start_epoch, 0.0
    if args.resume:
        logger.info(f"=> loading checkpoint '{args.resume}'")
        state = ckpt.restore(args.resume, model, optimizer)
        start_epoch, best_acc1 = state["epoch"], float(state["best_acc1"])
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
        if env.is_main:
            state = classifier_state(epoch, args.arch, model, optimizer, best_acc1)
            save_checkpoint(state, is_best, args.output_dir)
            if epoch == start_epoch:
                sanity_check(model.state_dict(), reference, args)
        log.log(epoch_record(epoch, lr, train_stats, val_stats, best_acc1))
    return best_acc1


def classifier_state(epoch, arch, model, optimizer, best_acc1):
    """
    The original's linear-classification checkpoint after epoch `epoch` (from 0):
    completed epochs, arch, state_dict ('module.*'), optimizer and best_acc1.
    """
    state = ckpt.model_state(epoch + 1, arch, model, optimizer)
    state["best_acc1"] = best_acc1
    return state


def save_checkpoint(state, is_best, output_dir):
    """
    The original's: `state` to checkpoint.pth.tar, copied to model_best.pth.tar if
    it is the best so far; each file written whole or not at all.
    """
    path = os.path.join(output_dir, "checkpoint.pth.tar")
    ckpt.save_atomically(state, path)
    if is_best:
        ckpt.copy_atomically(path, os.path.join(output_dir, "model_best.pth.tar"))


def check_resume(path, arch, model, hint=""):
    """
    Refuse a --resume file that is not a linear classifier of `model` (a fresh one
    of -a `arch`); hint: what else must match, for the message.
    """
    state = ckpt.load_checkpoint(path, what="--resume checkpoint")
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        problem = "no state_dict"
    else:
        missing = [k for k in ("epoch", "optimizer", "best_acc1") if k not in state]
        problem = f"no {missing[0]!r}" if missing else None
        if problem and any("encoder_q." in k for k in sd):
            problem += "; a pretraining checkpoint goes to --pretrained"
    if problem:
        raise ckpt.CheckpointError(
            f"--resume {path!r} is not a checkpoint of main_lincls.py ({problem})"
        )
    if state.get("arch", arch) != arch:
        raise ckpt.CheckpointError(
            f"--resume {path!r} is a {state['arch']} model; got -a {arch}"
        )
    try:
        model.load_state_dict(ckpt.without_module_prefix(sd))
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ckpt.CheckpointError(
            f"--resume {path!r} does not fit -a {arch}{hint}: {detail[:200]}"
        ) from None


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
    meters = ValidationMeters(len(val_loader))

    # switch to evaluate mode
    model.eval()

    with torch.no_grad():
        for i, (images, target) in enumerate(val_loader):
            images = images.to(env.device, non_blocking=True)
            target = target.to(env.device, non_blocking=True)

            # compute output
            output = model(images)
            loss = criterion(output, target)

            # measure accuracy and record loss, and elapsed time
            loss_value, acc1, acc5 = read_step(loss, output, target)
            meters.update(loss_value, acc1, acc5, images.size(0))

            if i % args.print_freq == 0:
                meters.progress.display(i)

    totals = torch.tensor(meters.totals(), dtype=torch.float64, device=env.device)
    return accuracy_report(totals)


def cached_probe(env, args, model, optimizer, reference, batch_size, workers):
    """
    --cached-features: model.fc trained by `optimizer` on the backbone's features of
    every image, extracted once (moco/probe.py), with the report, log records and
    checkpoint files of the protocol on images. Returns the best validation Acc@1.
    """
    log = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), env.is_main)
    train_set, val = cached_features(env, args, model, batch_size, workers, log)
    result = probe.fit(
        model.fc,
        optimizer,
        train_set,
        val,
        env,
        epochs=args.epochs,
        lr=args.lr,
        schedule=args.schedule,
        batch_size=batch_size * env.world_size,
        seed=shared_seed(args.seed),
        print_freq=args.print_freq,
        log=log,
    )
    if env.is_main:
        save_cached_probe(args, model, optimizer, result)
        sanity_check(model.state_dict(), reference, args)
    return result.best_acc1


def cached_features(env, args, model, batch_size, workers, log):
    """
    The backbone's features of DIR/train and DIR/val (Features, all of them on
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
        options = knn.KnnOptions()
        share = shard_range(train_set.x.shape[0], env.rank, env.world_size)
        bank = F.normalize(train_set.x[share.start : share.stop], dim=1)
        acc = knn.knn_top1(
            Features(F.normalize(val.x, dim=1), val.y),
            Features(bank, train_set.y, share.start),
            model.fc.out_features,
            options.k,
            options.t,
        )
        logger.info(f" * kNN Acc@1 {acc:.2f} (k {options.k}, t {options.t})")
        log.log({"kind": "knn", "knn_acc1": acc, "k": options.k, "t": options.t})
    return train_set, val


def save_cached_probe(args, model, optimizer, result):
    """
    The original's files: model_best.pth.tar with the fc of the best epoch,
    checkpoint.pth.tar with the last one's. The optimizer's momentum belongs to the
    standardised features: the files hold none, and the learning rate of their epoch.
    """
    optimizer.state.clear()
    last = args.epochs - 1
    files = [(*result.best, True)] if result.best else []
    if result.best is None or result.best[0] != last:
        files.append((last, result.last, False))
    for epoch, fc, is_best in files:
        model.fc.load_state_dict(fc)
        adjust_learning_rate(optimizer, epoch, args.lr, args.epochs, args.schedule)
        state = classifier_state(epoch, args.arch, model, optimizer, result.best_acc1)
        save_checkpoint(state, is_best, args.output_dir)


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
        reference, _ = encoder_state_dict(obj, source)
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
