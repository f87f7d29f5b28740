#!/usr/bin/env python
"""MoCo v1/v2 pretraining: the original's command line, on any machine.

    python main_moco.py -a resnet50 --lr 0.03 --batch-size 256 \
      --dist-url 'tcp://localhost:10001' --multiprocessing-distributed \
      --world-size 1 --rank 0 [your imagenet-folder with train and val folders]

MoCo v2: add --mlp --moco-t 0.2 --aug-plus --cos. Also runs on one GPU, on the CPU
and under torchrun (see README.md).
"""

import argparse
import functools
import math
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.backends.cudnn as cudnn
import torch.nn as nn

import moco.builder
from moco import checkpoint as ckpt
from moco.data import EpochSampler, SeededImageFolder, check_image_folder
from moco.distributed import (
    PREEMPTED_EXIT_CODE,
    StopSignal,
    broadcast_object,
    check_launch_args,
    cleanup,
    init_distributed,
    launch,
    procs_per_node,
    total_processes,
)
from moco.loader import AUG_IMPLS, pretrain_transform
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


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="MoCo pretraining (PyTorch ImageNet training)"
    )
    parser.add_argument("data", metavar="DIR", help="path to dataset (reads DIR/train)")
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
        "--epochs",
        default=200,
        type=int,
        metavar="N",
        help="number of total epochs to run",
    )
    parser.add_argument(
        "--start-epoch",
        default=0,
        type=int,
        metavar="N",
        help="manual epoch number (useful on restarts)",
    )
    parser.add_argument(
        "-b",
        "--batch-size",
        default=256,
        type=int,
        metavar="N",
        help="mini-batch size (default: 256), this is the total batch size "
        "of all GPUs on the current node",
    )
    parser.add_argument(
        "--lr",
        "--learning-rate",
        default=0.03,
        type=float,
        metavar="LR",
        help="initial learning rate",
        dest="lr",
    )
    parser.add_argument(
        "--schedule",
        default=[120, 160],
        nargs="*",
        type=int,
        help="learning rate schedule (when to drop lr by 10x)",
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
        default=1e-4,
        type=float,
        metavar="W",
        help="weight decay (default: 1e-4)",
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
        "--resume",
        default="",
        type=str,
        metavar="PATH",
        help="path to a checkpoint, or 'auto' for the newest valid one in "
        "--output-dir (default: none)",
    )
    parser.add_argument(
        "--world-size",
        default=-1,
        type=int,
        help="number of nodes for distributed training",
    )
    parser.add_argument(
        "--rank", default=-1, type=int, help="node rank for distributed training"
    )
    parser.add_argument(
        "--dist-url",
        default="tcp://224.66.41.62:23456",
        type=str,
        help="url used to set up distributed training",
    )
    parser.add_argument(
        "--dist-backend",
        default="nccl",
        type=str,
        help="distributed backend (gloo is used where there is no GPU)",
    )
    parser.add_argument(
        "--seed",
        default=None,
        type=int,
        help="seed for initializing training; makes a run reproducible",
    )
    parser.add_argument("--gpu", default=None, type=int, help="GPU id to use.")
    parser.add_argument(
        "--multiprocessing-distributed",
        action="store_true",
        help="Use multi-processing distributed training to launch N processes "
        "per node, which has N GPUs",
    )

    # moco specific configs:
    parser.add_argument(
        "--moco-dim", default=128, type=int, help="feature dimension (default: 128)"
    )
    parser.add_argument(
        "--moco-k",
        default=65536,
        type=int,
        help="queue size; number of negative keys (default: 65536)",
    )
    parser.add_argument(
        "--moco-m",
        default=0.999,
        type=float,
        help="moco momentum of updating key encoder (default: 0.999)",
    )
    parser.add_argument(
        "--moco-t", default=0.07, type=float, help="softmax temperature (default: 0.07)"
    )

    # options for moco v2
    parser.add_argument("--mlp", action="store_true", help="use mlp head")
    parser.add_argument(
        "--aug-plus", action="store_true", help="use moco v2 data augmentation"
    )
    parser.add_argument("--cos", action="store_true", help="use cosine lr schedule")

    # this project's additions
    extra = parser.add_argument_group("additions to the original")
    extra.add_argument(
        "--output-dir",
        default=".",
        metavar="DIR",
        help="where checkpoints and logs go (default: the current folder)",
    )
    extra.add_argument(
        "--input-size",
        default=224,
        type=int,
        metavar="PX",
        help="crop size in pixels (default: 224)",
    )
    extra.add_argument(
        "--small-stem",
        action="store_true",
        help="ResNet stem for small images: conv1 3x3 stride 1, no max-pool "
        "(the official CIFAR-10 demo's)",
    )
    extra.add_argument(
        "--bn-splits",
        default=1,
        type=int,
        metavar="N",
        help="BatchNorm statistics over N groups of each process's batch, "
        "as N GPUs would (default: 1)",
    )
    extra.add_argument(
        "--symmetric",
        action="store_true",
        help="symmetric loss: each crop is a query once, both keys enqueued",
    )
    extra.add_argument(
        "--procs-per-node",
        default=0,
        type=int,
        metavar="N",
        help="processes per node with --multiprocessing-distributed "
        "(default: one per GPU, or 1 without GPU)",
    )
    extra.add_argument(
        "--dist-timeout",
        default=1800,
        type=int,
        metavar="S",
        help="seconds before a collective waiting on a dead process fails",
    )
    extra.add_argument(
        "--save-freq",
        default=0,
        type=int,
        metavar="N",
        help="also checkpoint every N steps within an epoch (default: 0, off)",
    )
    extra.add_argument(
        "--keep-last",
        default=0,
        type=int,
        metavar="N",
        help="keep only the newest N epoch checkpoints (default: 0, all)",
    )
    extra.add_argument(
        "--aug-impl",
        default="fast",
        choices=AUG_IMPLS,
        help="augmentation code: 'fast' (the same recipe and random draws, "
        "faster operations, pixels within a few grey levels) or 'original' "
        "(torchvision/PIL, pixel for pixel as the original)",
    )
    extra.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="log and skip unreadable images instead of stopping",
    )
    extra.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision for the encoders (logits and queue in fp32)",
    )
    extra.add_argument(
        "--amp-dtype",
        default="bfloat16",
        choices=["bfloat16", "float16"],
        help="mixed precision type; float16 uses a gradient scaler",
    )
    extra.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last memory format (faster convolutions on GPUs)",
    )
    extra.add_argument(
        "--compile", action="store_true", help="torch.compile the encoders"
    )
    extra.add_argument(
        "--knn-freq",
        default=0,
        type=int,
        metavar="N",
        help="kNN accuracy of the query encoder every N epochs, on DIR/train "
        "as memory bank and DIR/val as queries (default: 0, off)",
    )
    extra.add_argument("--knn-k", default=200, type=int, help="k of the kNN monitor")
    extra.add_argument(
        "--knn-t", default=0.1, type=float, help="temperature of the kNN monitor"
    )
    return parser


def check_args(args):
    """Refuse impossible settings with one line each, before any data is read."""
    positive = {
        "--epochs": args.epochs,
        "-b/--batch-size": args.batch_size,
        "--moco-dim": args.moco_dim,
        "--moco-k": args.moco_k,
        "--input-size": args.input_size,
        "--bn-splits": args.bn_splits,
        "-p/--print-freq": args.print_freq,
    }
    for name, value in positive.items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    for name, value in {
        "-j/--workers": args.workers,
        "--start-epoch": args.start_epoch,
        "--save-freq": args.save_freq,
        "--keep-last": args.keep_last,
        "--knn-freq": args.knn_freq,
    }.items():
        if value < 0:
            raise UsageError(f"{name} must be zero or positive, got {value}")
    if not 0 <= args.moco_m < 1:
        raise UsageError(f"--moco-m must be in [0, 1), got {args.moco_m}")
    if args.moco_t <= 0:
        raise UsageError(f"--moco-t must be positive, got {args.moco_t}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    check_arch(args.arch, args.mlp, args.small_stem)
    check_launch_args(args)
    if args.knn_freq:
        from moco.knn import check_knn_data

        check_knn_data(args.data)  # DATA/val with DATA/train's classes

    per_proc = args.batch_size // procs_per_node(args)
    if per_proc % args.bn_splits:
        raise UsageError(
            f"the batch of each process ({per_proc}) does not split into --bn-splits "
            f"{args.bn_splits} groups"
        )
    keys_per_step = per_proc * total_processes(args) * (2 if args.symmetric else 1)
    if args.moco_k < keys_per_step:
        raise UsageError(
            f"--moco-k {args.moco_k} is smaller than the {keys_per_step} keys enqueued "
            "per step "
            "(the global batch); use a larger queue or a smaller batch"
        )
    if args.amp and args.amp_dtype == "float16" and not torch.cuda.is_available():
        raise UsageError("--amp-dtype float16 needs a GPU; on the CPU use bfloat16")
    ckpt.check_output_dir(args.output_dir)


def resume_path(args):
    """The checkpoint --resume names ('auto': the newest valid one), or None."""
    if args.resume == "auto":
        return ckpt.find_latest_checkpoint(args.output_dir)
    return args.resume or None


def check_resume(args):
    """Refuse a checkpoint that does not fit the model asked for."""
    path = resume_path(args)
    if path is None:
        return
    state = ckpt.load_checkpoint(path, what="--resume checkpoint")
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict) or "module.queue" not in sd:
        raise UsageError(f"--resume {path!r} is not a MoCo pretraining checkpoint")
    if state.get("arch", args.arch) != args.arch:
        raise UsageError(
            f"--resume {path!r} is a {state['arch']} checkpoint; got -a {args.arch}"
        )
    dim, K = sd["module.queue"].shape
    if (dim, K) != (args.moco_dim, args.moco_k):
        raise UsageError(
            f"--resume {path!r} has --moco-dim {dim} --moco-k {K}; got --moco-dim "
            f"{args.moco_dim} --moco-k {args.moco_k}"
        )
    mlp = "module.encoder_q.fc.0.weight" in sd
    if mlp != args.mlp:
        raise UsageError(
            f"--resume {path!r} was trained {'with' if mlp else 'without'} --mlp; "
            f"add or drop --mlp to match"
        )


def main(args):
    check_args(args)
    check_resume(args)
    classes, n_images = check_image_folder(
        os.path.join(args.data, "train"), "training data"
    )
    world_size = total_processes(args)
    per_proc = args.batch_size // procs_per_node(args)
    if math.ceil(n_images / world_size) < per_proc:
        raise UsageError(
            f"{n_images} training images give no full batch of {per_proc} per process "
            f"({world_size} processes); use a smaller -b or more images"
        )
    return launch(main_worker, args)


def main_worker(local_rank, procs_per_node, args):
    env = init_distributed(local_rank, procs_per_node, args)
    setup_logging(env.rank)
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

    # create model
    logger.info(f"=> creating model '{args.arch}'")
    base_encoder = functools.partial(
        build_encoder, args.arch, small_stem=args.small_stem, bn_splits=args.bn_splits
    )
    model = moco.builder.MoCo(
        base_encoder,
        args.moco_dim,
        args.moco_k,
        args.moco_m,
        args.moco_t,
        args.mlp,
        symmetric=args.symmetric,
    )
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        # compiled CPU kernels are C++ built at the first step; say so now, not then
        if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
            raise UsageError(
                "--compile on the CPU needs a C++ compiler (g++, or CXX set "
                "to one); install one or drop --compile"
            )
        model.encoder_q.compile()  # in place: the state_dict names do not change
        model.encoder_k.compile()
    model_ddp = model
    if env.distributed:
        # buffers (queue, BatchNorm statistics) are not broadcast each step: the queue is
        # the same on every process already, and each key encoder keeps its own statistics
        model_ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            forward_sync_buffers=False,
        )

    criterion = nn.CrossEntropyLoss()
    # every parameter, the frozen key encoder's included, as the original (its files load)
    optimizer = torch.optim.SGD(
        model.parameters(),
        args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler(
        device.type, enabled=args.amp and amp_dtype == torch.float16
    )

    # optionally resume from a checkpoint
    start_epoch, start_iter = args.start_epoch, 0
    data_seed = (
        args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    )
    data_seed = broadcast_object(data_seed)
    path = resume_path(args)
    if path:
        logger.info(f"=> loading checkpoint '{path}'")
        state = ckpt.load_checkpoint(
            path, map_location=device, what="--resume checkpoint"
        )
        model.load_state_dict(
            {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
        )
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_iter = state["epoch"], state.get("iter", 0)
        data_seed = state.get("data_seed", data_seed)
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"])
        logger.info(
            f"=> loaded checkpoint '{path}' (epoch {start_epoch}, step {start_iter})"
        )
    elif args.resume == "auto":
        logger.info(
            f"=> no checkpoint in '{args.output_dir}' yet: starting from scratch"
        )

    # Data loading code
    train_dataset = SeededImageFolder(
        os.path.join(args.data, "train"),
        pretrain_transform(args.aug_plus, args.input_size, impl=args.aug_impl),
        data_seed=data_seed,
        skip_bad=args.skip_bad_images,
    )
    train_sampler = EpochSampler(
        train_dataset, env.world_size, env.rank, data_seed=data_seed
    )
    train_loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=batch_size,
        sampler=train_sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator(),  # the loader's own seed does not touch torch's state
    )
    steps_per_epoch = len(train_sampler) // batch_size

    log = JsonLogger(
        os.path.join(args.output_dir, "log.jsonl"),
        env.is_main,
        tensorboard_dir=os.path.join(args.output_dir, "tensorboard"),
    )
    # the run's arguments first: a record, and the queue size for the plot's chance line
    log.log({"kind": "args", **vars(args)})
    print_summary(args, env, batch_size, steps_per_epoch, len(train_dataset))

    stop = StopSignal()
    run = dict(
        env=env,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        stop=stop,
        log=log,
        data_seed=data_seed,
        steps_per_epoch=steps_per_epoch,
        amp_dtype=amp_dtype,
    )
    try:
        for epoch in range(start_epoch, args.epochs):
            train_sampler.set_epoch(
                epoch, start=start_iter * batch_size if epoch == start_epoch else 0
            )
            lr = adjust_learning_rate(optimizer, epoch, args)
            first = start_iter if epoch == start_epoch else 0

            # train for one epoch
            stopped = train(
                train_loader,
                model_ddp,
                criterion,
                optimizer,
                epoch,
                args,
                run,
                first,
                lr,
            )
            if stopped:
                raise SystemExit(PREEMPTED_EXIT_CODE)

            if env.is_main:
                save(args, run, epoch + 1, 0, f"checkpoint_{epoch:04d}.pth.tar")
                last = os.path.join(args.output_dir, ckpt.LAST_NAME)
                if os.path.exists(last):
                    os.remove(last)  # superseded by the epoch's file
                ckpt.remove_old_checkpoints(args.output_dir, args.keep_last)

            if args.knn_freq and (epoch + 1) % args.knn_freq == 0:
                knn_monitor(model, args, env, epoch, log)
    finally:
        stop.restore()
        cleanup()


def train(train_loader, model, criterion, optimizer, epoch, args, run, first, lr):
    """One epoch from step `first`; returns True when stopped by a signal (checkpointed)."""
    env = run["env"]
    device = env.device
    batch_time = AverageMeter("Time", ":6.3f")
    data_time = AverageMeter("Data", ":6.3f")
    losses = AverageMeter("Loss", ":.4e")
    top1 = AverageMeter("Acc@1", ":6.2f")
    top5 = AverageMeter("Acc@5", ":6.2f")
    total = run["steps_per_epoch"]
    progress = ProgressMeter(
        total,
        [batch_time, data_time, losses, top1, top5],
        prefix=f"Epoch: [{epoch}]",
    )
    autocast = torch.autocast(device.type, dtype=run["amp_dtype"], enabled=args.amp)
    memory_format = (
        torch.channels_last if args.channels_last else torch.contiguous_format
    )

    # switch to train mode
    model.train()

    epoch_start = end = time.time()
    for i, (images, _) in enumerate(train_loader, start=first):
        # measure data loading time
        data_time.update(time.time() - end)

        im_q = images[0].to(device, non_blocking=True, memory_format=memory_format)
        im_k = images[1].to(device, non_blocking=True, memory_format=memory_format)

        # compute output
        with autocast:
            output, target = model(im_q=im_q, im_k=im_k)
        loss = criterion(output, target)
        if args.symmetric:
            loss = loss * 2  # the official demo sums the two directions' mean losses

        # stop everywhere at once on a signal or a non-finite loss, before any update
        loss_value = loss.item()
        flags = torch.tensor(
            [run["stop"].received is not None, not math.isfinite(loss_value)]
        )
        if env.distributed:
            flags = flags.to(device, torch.int32)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            flags = flags.cpu()
        if flags[1]:
            bad = (
                loss_value if not math.isfinite(loss_value) else "non-finite elsewhere"
            )
            raise UsageError(
                f"the loss became {bad} at epoch {epoch} step {i}; stopped "
                "without saving (the last checkpoint in "
                f"{args.output_dir!r} is intact). Try a lower --lr or --amp-dtype bfloat16"
            )

        # acc1/acc5 are (K+1)-way contrast classifier accuracy
        # measure accuracy and record loss
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss_value, im_q.size(0))
        top1.update(acc1, im_q.size(0))
        top5.update(acc5, im_q.size(0))

        # compute gradient and do SGD step
        optimizer.zero_grad()
        run["scaler"].scale(loss).backward()
        run["scaler"].step(optimizer)
        run["scaler"].update()

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        if i % args.print_freq == 0:
            progress.display(i)
            done = i + 1 - first
            run["log"].log(
                {
                    "kind": "step",
                    "epoch": epoch,
                    "step": i,
                    "global_step": epoch * total + i,
                    "loss": losses.val,
                    "acc1": top1.val,
                    "acc5": top5.val,
                    "lr": lr,
                    "images_per_s": im_q.size(0)
                    * env.world_size
                    / max(batch_time.val, 1e-9),
                    "data_share": data_time.sum / max(batch_time.sum, 1e-9),
                    "epoch_eta_s": (end - epoch_start) / done * (total - i - 1),
                },
                step=epoch * total + i,
            )

        steps_done = i + 1
        if flags[0]:
            if env.is_main:
                save(args, run, epoch, steps_done, ckpt.LAST_NAME)
                logger.info(
                    f"=> stopped by a signal at epoch {epoch} step {steps_done}; resume "
                    f"with --resume auto --output-dir {args.output_dir}"
                )
            return True
        if args.save_freq and steps_done % args.save_freq == 0 and steps_done < total:
            if env.is_main:
                save(args, run, epoch, steps_done, ckpt.LAST_NAME)

    elapsed = time.time() - epoch_start
    run["log"].log(
        {
            "kind": "epoch",
            "epoch": epoch,
            "loss": losses.avg,
            "acc1": top1.avg,
            "acc5": top5.avg,
            "lr": lr,
            "epoch_time_s": elapsed,
            "images_per_s": losses.count * env.world_size / max(elapsed, 1e-9),
            "data_share": data_time.sum / max(batch_time.sum, 1e-9),
            "eta_s": elapsed * (args.epochs - epoch - 1),
        },
        step=(epoch + 1) * total,
    )
    skipped = int(train_loader.dataset.skipped)
    if skipped:
        logger.warning(f"=> {skipped} unreadable image(s) skipped so far")
    return False


def save(args, run, epoch, steps_done, name):
    """Checkpoint in the original's format plus what an exact resume needs."""
    state = {
        "epoch": epoch,  # completed epochs
        "iter": steps_done,  # steps done in the epoch in progress
        "arch": args.arch,
        "state_dict": {"module." + k: v for k, v in run["model"].state_dict().items()},
        "optimizer": run["optimizer"].state_dict(),
        "args": {k: v for k, v in vars(args).items()},
        "data_seed": run["data_seed"],
        "rng": get_rng_state(),
    }
    if run["scaler"].is_enabled():
        state["scaler"] = run["scaler"].state_dict()
    ckpt.save_checkpoint(state, os.path.join(args.output_dir, name))


def get_rng_state():
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(
        tuple(tuple(x) if isinstance(x, list) else x for x in state["python"])
    )
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _numpy_state_to_plain(state):
    kind, keys, pos, has_gauss, cached = state
    return (
        kind,
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    )


def print_summary(args, env, batch_size, steps_per_epoch, n_images):
    """The derived values users otherwise get wrong, printed once."""
    global_batch = batch_size * env.world_size
    keys = global_batch * (2 if args.symmetric else 1)
    precision = (
        f"{args.amp_dtype} autocast (logits, queue in float32)"
        if args.amp
        else "float32"
    )
    lines = [
        f"processes: {env.world_size} ({env.procs_per_node} per node), device {env.device}",
        f"batch: {batch_size} per process, {global_batch} global",
        f"learning rate: {args.lr:g} (linear scaling for this batch: "
        f"{0.03 * global_batch / 256:g} = 0.03 x {global_batch}/256)",
        f"queue: {args.moco_k} keys = {args.moco_k / keys:g} steps of {keys} keys"
        + (
            ""
            if args.moco_k % keys == 0
            else " (not a multiple: the enqueue wraps around)"
        ),
        f"augmentation: {'MoCo v2 (--aug-plus)' if args.aug_plus else 'MoCo v1'}, "
        f"{args.input_size}px crops ({args.aug_impl} code); "
        f"head: {'MLP' if args.mlp else 'linear'}; "
        f"schedule: {'cosine' if args.cos else 'steps at ' + str(args.schedule)}",
        f"data: {n_images} images, {steps_per_epoch} steps per epoch; "
        f"precision: {precision}",
        f"output: {os.path.abspath(args.output_dir)}",
    ]
    for line in lines:
        logger.info("=> " + line)


def knn_monitor(model, args, env, epoch, log):
    from moco.knn import knn_monitor_accuracy

    acc = knn_monitor_accuracy(model.encoder_q, args, env)
    logger.info(
        f" * kNN Acc@1 {acc:.2f} (epoch {epoch}, k {args.knn_k}, t {args.knn_t})"
    )
    log.log({"kind": "knn", "epoch": epoch, "knn_acc1": acc}, step=epoch + 1)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
