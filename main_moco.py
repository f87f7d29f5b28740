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
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn

import moco.builder
from moco import checkpoint as ckpt
from moco.batch_augment import BatchAugment, ReadAndSample, collate
from moco.cli import (
    add_data_arguments,
    add_image_arguments,
    add_knn_arguments,
    add_launch_arguments,
    add_training_arguments,
    check_ranges,
    knn_options,
    launch_settings,
    run_cli,
)
from moco.data import EpochSampler, pretrain_images, queue_warning, require_labels
from moco.distributed import (
    Launch,
    any_process,
    cleanup,
    ignore_stop_signals,
    init_distributed,
    launch,
    per_process,
    shared_seed,
    wrap_ddp,
)
from moco.knn import KnnOptions, check_knn_data, knn_accuracy
from moco.loader import AUG_IMPLS, RECIPES, normalization, pretrain_transform
from moco.meters import JsonLogger, TrainMeters, read_step
from moco.models import build_encoder, check_arch
from moco.utils import (
    NonFiniteLossError,
    UsageError,
    adjust_learning_rate,
    logger,
    seed_everything,
)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="MoCo pretraining (PyTorch ImageNet training)"
    )
    add_data_arguments(parser)
    add_training_arguments(
        parser,
        "path to a checkpoint, or 'auto' for the newest valid one in --output-dir "
        "(default: none)",
    )
    parser.set_defaults(epochs=200, lr=0.03, schedule=[120, 160], weight_decay=1e-4)
    add_launch_arguments(parser)
    add_image_arguments(parser)

    # moco specific configs:
    moco_group = parser.add_argument_group("MoCo")
    moco_group.add_argument(
        "--moco-dim", default=128, type=int, help="feature dimension (default: 128)"
    )
    moco_group.add_argument(
        "--moco-k",
        default=65536,
        type=int,
        help="queue size; number of negative keys (default: 65536)",
    )
    moco_group.add_argument(
        "--moco-m",
        default=0.999,
        type=float,
        help="moco momentum of updating key encoder (default: 0.999)",
    )
    moco_group.add_argument(
        "--moco-t", default=0.07, type=float, help="softmax temperature (default: 0.07)"
    )

    # options for moco v2
    moco_group.add_argument("--mlp", action="store_true", help="use mlp head")
    moco_group.add_argument(
        "--aug-plus", action="store_true", help="use moco v2 data augmentation"
    )
    moco_group.add_argument("--cos", action="store_true", help="use cosine lr schedule")

    extra = parser.add_argument_group("additions to the original")
    extra.add_argument(
        "--aug",
        default=None,
        choices=RECIPES,
        help="augmentation recipe: v1 (MoCo v1's), v2 (MoCo v2's, as --aug-plus) or "
        "cifar10 (the official CIFAR-10 demo's) (default: v1, v2 with --aug-plus)",
    )
    extra.add_argument(
        "--bn-splits",
        default=1,
        type=int,
        metavar="N",
        help="BatchNorm statistics over N groups of each process's batch, as N GPUs "
        "would (default: 1)",
    )
    extra.add_argument(
        "--train-list",
        default=None,
        metavar="FILE",
        help="pretrain on the images listed in FILE, one path per line (absolute or "
        "relative to DIR; blank lines and # comments skipped), in its order "
        "(default: every image under DIR/train, class folders or not, else under DIR)",
    )
    extra.add_argument(
        "--symmetric",
        action="store_true",
        help="symmetric loss: each crop is a query once, both keys enqueued",
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
        help="augmentation code: 'fast' (the same recipe and random draws, faster "
        "operations, pixels within a few grey levels), 'original' (torchvision/PIL, "
        "pixel for pixel as the original) or 'batched' (loader workers only read the "
        "files; JPEGs decoded and augmented in batches on the training device, the "
        "same random draws: for GPUs that outrun the CPU workers)",
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
        help="kNN accuracy of the query encoder every N epochs, on DIR/train as memory "
        "bank and DIR/val as queries (default: 0, off)",
    )
    add_knn_arguments(extra)
    return parser


@dataclass(frozen=True)
class Plan:
    """What the arguments imply, derived once by check_args and read everywhere else."""

    launch: Launch
    # processes on this node and in the whole run
    procs_per_node: int
    world_size: int
    # this process's share of the node's batch (-b) and loader workers (-j)
    batch_size: int
    workers: int
    # the augmentation recipe: --aug, else v2 with --aug-plus, else v1
    recipe: str
    # keys enqueued per step by all processes: the global batch, twice with --symmetric
    keys_per_step: int
    # the kNN monitor's options (--knn-freq)
    knn: KnnOptions

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


def check_args(args: argparse.Namespace) -> Plan:
    """
    Refuse impossible settings with one line each, before any data is read; returns
    what they imply.
    """
    check_ranges(
        positive={
            "--epochs": args.epochs,
            "-b/--batch-size": args.batch_size,
            "--moco-dim": args.moco_dim,
            "--moco-k": args.moco_k,
            "--input-size": args.input_size,
            "--bn-splits": args.bn_splits,
            "-p/--print-freq": args.print_freq,
            "--lr": args.lr,
            "--moco-t": args.moco_t,
        },
        non_negative={
            "-j/--workers": args.workers,
            "--start-epoch": args.start_epoch,
            "--save-freq": args.save_freq,
            "--keep-last": args.keep_last,
            "--knn-freq": args.knn_freq,
        },
    )
    if not 0 <= args.moco_m < 1:
        raise UsageError(f"--moco-m must be in [0, 1), got {args.moco_m}")
    if args.aug_plus and args.aug not in (None, "v2"):
        raise UsageError(f"--aug-plus is --aug v2; drop one of it and --aug {args.aug}")
    check_arch(args.arch, args.mlp, args.small_stem)
    launch = launch_settings(args)
    launch.check(args.batch_size)
    # refuses a --knn-k or --knn-t out of range
    knn = knn_options(args)
    if args.knn_freq:
        require_labels(args.data, "the kNN monitor (--knn-freq)")
        check_knn_data(args.data, args.input_size if args.knn_crop == "none" else None)

    procs_per_node = launch.processes_per_node()
    world_size = launch.total_processes()
    batch_size, workers = per_process(args.batch_size, args.workers, procs_per_node)
    if batch_size % args.bn_splits:
        raise UsageError(
            f"the batch of each process ({batch_size}) does not split into "
            f"--bn-splits {args.bn_splits} groups"
        )
    keys_per_step = batch_size * world_size * (2 if args.symmetric else 1)
    if args.moco_k < keys_per_step:
        raise UsageError(
            f"--moco-k {args.moco_k} is smaller than the {keys_per_step} keys enqueued "
            "per step (the global batch); use a larger queue or a smaller batch"
        )
    if args.aug_impl == "batched" and args.skip_bad_images:
        raise UsageError(
            "--skip-bad-images needs images decoded in the loader workers: use "
            "--aug-impl fast or original with it"
        )
    if args.amp and args.amp_dtype == "float16" and not torch.cuda.is_available():
        raise UsageError("--amp-dtype float16 needs a GPU; on the CPU use bfloat16")
    ckpt.check_output_dir(args.output_dir)
    path = ckpt.resume_path(args.resume, args.output_dir)
    if path:
        ckpt.check_pretrain_resume(
            path, args.arch, args.moco_dim, args.moco_k, args.mlp
        )
    return Plan(
        launch,
        procs_per_node,
        world_size,
        batch_size,
        workers,
        recipe=args.aug or ("v2" if args.aug_plus else "v1"),
        keys_per_step=keys_per_step,
        knn=knn,
    )


def main(args):
    plan = check_args(args)
    images = pretrain_images(args.data, args.train_list)
    n_images = len(images.paths)
    if math.ceil(n_images / plan.world_size) < plan.batch_size:
        raise UsageError(
            f"{n_images} training images give no full batch of {plan.batch_size} per "
            f"process ({plan.world_size} processes); use a smaller -b or more images"
        )
    # the images found here go to every process of this node: listed once
    return launch(main_worker, plan.launch, args, plan, images)


def main_worker(local_rank, procs_per_node, args, plan, images):
    env = init_distributed(local_rank, procs_per_node, plan.launch)
    seed_everything(args.seed)

    # create model
    logger.info(f"=> creating model '{args.arch}'")
    model = create_model(args, env.device)
    model_ddp = wrap_ddp(model, env.device) if env.distributed else model

    criterion = nn.CrossEntropyLoss()
    # every parameter, the frozen key encoder's included, as the original (its files
    # load)
    optimizer = torch.optim.SGD(
        model.parameters(),
        args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    scaler = torch.amp.GradScaler(
        env.device.type, enabled=args.amp and args.amp_dtype == "float16"
    )

    # the epochs' meters and the metric log; the run's arguments first: a record, and
    # the queue size for the plot's chance line
    meters = TrainMeters(world_size=env.world_size, epochs=args.epochs)
    log = JsonLogger(
        os.path.join(args.output_dir, "log.jsonl"),
        env.is_main,
        tensorboard_dir=os.path.join(args.output_dir, "tensorboard"),
    )
    log.log({"kind": "args", **vars(args)})

    checkpointer = ckpt.Checkpointer(
        args.output_dir,
        model,
        optimizer,
        scaler,
        arch=args.arch,
        args=vars(args),
        data_seed=shared_seed(args.seed),
        meters=meters,
        keep_last=args.keep_last,
        enabled=env.is_main,
    )
    # optionally resume from a checkpoint
    start_epoch, start_iter = checkpointer.resume_if_asked(
        args.resume, args.start_epoch
    )
    # from here on a stop signal ends the run at a step every process agrees on
    preemption = ckpt.Preemption(checkpointer, args.save_freq)
    try:
        # Data loading code
        train_loader, augment = create_loader(
            args, plan, checkpointer.data_seed, env, images
        )
        step = Step(
            model_ddp,
            criterion,
            optimizer,
            scaler,
            torch.autocast(
                env.device.type, dtype=getattr(torch, args.amp_dtype), enabled=args.amp
            ),
            torch.channels_last if args.channels_last else torch.contiguous_format,
            env.device,
            args.symmetric,
            augment,
        )
        print_summary(args, plan, env, train_loader)

        for epoch in range(start_epoch, args.epochs):
            first = start_iter if epoch == start_epoch else 0
            train_loader.sampler.set_epoch(epoch, start=first * plan.batch_size)
            adjust_learning_rate(
                optimizer, epoch, args.lr, args.epochs, args.schedule, args.cos
            )

            # train for one epoch
            train(train_loader, step, meters, epoch, args, preemption, log, first)
            checkpointer.save_epoch(epoch)
            preemption.after_epoch()

            if args.knn_freq and (epoch + 1) % args.knn_freq == 0:
                knn_monitor(model.encoder_q, args, plan, env, epoch, log)
    finally:
        preemption.close()
        cleanup()


def create_model(args, device):
    """The MoCo model on `device`, in the memory format and compilation asked for."""
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
        # compiled CPU kernels are C++ built at the first step: say so now, not then
        if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
            raise UsageError(
                "--compile on the CPU needs a C++ compiler (g++, or CXX set to one); "
                "install one or drop --compile"
            )
        # in place: the state_dict names do not change
        model.encoder_q.compile()
        model.encoder_k.compile()
    return model


def create_loader(args, plan, data_seed, env, images):
    """
    Pairs of crops of `images`, this process's share, in a resumable order, and None;
    with --aug-impl batched, the files' bytes and the crops' random draws, and the
    BatchAugment that makes the crops from them on the device.
    """
    batched = args.aug_impl == "batched"
    if batched:
        transform = ReadAndSample(plan.recipe, args.input_size)
        mean, std = normalization(args.normalize)
        augment = BatchAugment(plan.recipe, args.input_size, mean, std)
        if env.device.type == "cpu":
            logger.warning(
                "=> --aug-impl batched on the CPU: the same crops as --aug-impl fast, "
                "made in the training process (slower here; it is meant for GPUs)"
            )
    else:
        transform = pretrain_transform(
            plan.recipe, args.input_size, args.aug_impl, args.normalize
        )
        augment = None
    logger.info(f"=> {images.layout}")
    train_dataset = images.dataset(
        transform,
        data_seed=data_seed,
        skip_bad=args.skip_bad_images,
        decode=not batched,
    )
    train_sampler = EpochSampler(
        train_dataset, env.world_size, env.rank, data_seed=data_seed
    )
    loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=plan.batch_size,
        sampler=train_sampler,
        num_workers=plan.workers,
        pin_memory=env.device.type == "cuda",
        drop_last=True,
        collate_fn=collate if batched else None,
        # the loader's own seed does not touch torch's state
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
    return loader, augment


@dataclass
class Step:
    """What a training step needs, settled once by main_worker."""

    # the MoCo model, in DistributedDataParallel with several processes
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    # the precision and memory format of the step
    autocast: torch.autocast
    memory_format: torch.memory_format
    device: torch.device
    symmetric: bool = False
    # makes the crops on the device from what the loader gives (--aug-impl batched)
    augment: BatchAugment | None = None

    def inputs(self, images):
        """The query and key crops of a batch, on the device in the memory format."""
        if self.augment is not None:
            images = self.augment(images, self.device)
        return [
            x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            for x in images
        ]

    def __call__(self, im_q, im_k, stop_requested=False):
        """train_step with this step's model, optimizer and precision."""
        return train_step(
            self.model,
            self.criterion,
            self.optimizer,
            im_q,
            im_k,
            scaler=self.scaler,
            autocast=self.autocast,
            symmetric=self.symmetric,
            stop_requested=stop_requested,
        )


def train(train_loader, step, meters, epoch, args, preemption, log, first=0):
    """
    One epoch, from step `first` when resumed within it; logs and returns its
    statistics. A stop that every process agreed on ends the run within it
    (ckpt.Preemption).
    """
    total = train_loader.sampler.num_samples // train_loader.batch_size
    meters.start(epoch, total, first)
    lr = step.optimizer.param_groups[0]["lr"]

    # switch to train mode
    step.model.train()

    for i, (images, _) in enumerate(train_loader, start=first):
        # measure data loading time
        meters.loaded()
        im_q, im_k = step.inputs(images)

        # compute output, loss, gradient and SGD step
        try:
            _, loss, acc1, acc5, stop = step(
                im_q, im_k, stop_requested=preemption.requested
            )
        except NonFiniteLossError as e:
            raise e.at(epoch, i, args.output_dir) from None

        # acc1/acc5 are (K+1)-way contrast classifier accuracy
        meters.update(loss, acc1, acc5, im_q.size(0))
        if i % args.print_freq == 0:
            log.log(meters.step_record(i, lr), step=epoch * total + i)
        preemption.after_step(epoch, i + 1, total, stop)

    stats = meters.epoch_record(lr)
    log.log(stats, step=(epoch + 1) * total)
    skipped = int(train_loader.dataset.skipped)
    if skipped:
        logger.warning(f"=> {skipped} unreadable image(s) skipped so far")
    return stats


def train_step(
    model,
    criterion,
    optimizer,
    im_q,
    im_k,
    *,
    scaler,
    autocast,
    symmetric=False,
    stop_requested=False,
):
    """
    One MoCo step: forward, loss, backward, SGD. Returns (logits, loss, top-1 and
    top-5 accuracy in % of the (K+1)-way contrast, whether to stop now).
    Every process agrees, before the update, to stop on a signal any of them
    received, and to raise NonFiniteLossError on a NaN or infinite loss on any of them.
    """
    with autocast:
        output, target = model(im_q=im_q, im_k=im_k)
    loss = criterion(output, target)
    if symmetric:
        # the official demo sums the two directions' mean losses
        loss = loss * 2

    # whether any process was asked to stop or has a non-finite loss: agreed on the
    # device, then read with the loss and the accuracies in the step's one host read
    flags = torch.stack(
        [loss.new_full((), float(stop_requested)), (~loss.isfinite()).float()]
    )
    loss_value, acc1, acc5, stop, non_finite = read_step(
        loss, output, target, any_process(flags)
    )
    if non_finite:
        raise NonFiniteLossError(
            f"the loss became "
            f"{loss_value if not math.isfinite(loss_value) else 'non-finite elsewhere'}"
        )

    # compute gradient and do SGD step
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return output, loss_value, acc1, acc5, bool(stop)


def print_summary(args, plan, env, train_loader):
    """The derived values users otherwise get wrong, printed once."""
    keys = plan.keys_per_step
    precision = (
        f"{args.amp_dtype} autocast (logits, queue in float32)"
        if args.amp
        else "float32"
    )
    slow = emulated_amp_warning(args, env.device)
    if slow:
        precision += ", emulated on this CPU"
    wraps = "" if args.moco_k % keys == 0 else " (not a multiple: the enqueue wraps)"
    schedule = "cosine" if args.cos else f"steps at {args.schedule}"
    lines = [
        f"processes: {plan.world_size} ({plan.procs_per_node} per node), "
        f"device {env.device}",
        f"batch: {plan.batch_size} per process, {plan.global_batch} global",
        f"learning rate: {args.lr:g} (linear scaling for this batch: "
        f"{0.03 * plan.global_batch / 256:g} = 0.03 x {plan.global_batch}/256)",
        f"queue: {args.moco_k} keys = {args.moco_k / keys:g} steps of {keys} keys"
        + wraps,
        f"augmentation: {plan.recipe}, {args.input_size}px crops ({args.aug_impl} "
        f"code), {args.normalize} normalisation; head: "
        f"{'MLP' if args.mlp else 'linear'}; schedule: {schedule}",
        f"data: {len(train_loader.dataset)} images, {len(train_loader)} steps per "
        f"epoch; precision: {precision}",
        f"output: {os.path.abspath(args.output_dir)}",
    ]
    if env.slurm:
        lines.insert(1, env.slurm)
    for line in lines:
        logger.info("=> " + line)
    if slow and env.is_main:
        logger.warning("=> " + slow)
    warning = queue_warning(
        args.moco_k, len(train_loader.dataset), 2 if args.symmetric else 1, keys
    )
    if warning and env.is_main:
        logger.warning("=> " + warning)


def cpu_has_native_bfloat16() -> bool:
    """
    Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX, used by
    oneDNN); without, torch emulates it, many times slower than float32.
    """
    # ATEN_CPU_CAPABILITY=avx2 limits torch to AVX2 on any x86 CPU
    if torch.backends.cpu.get_cpu_capability() in ("NO AVX", "AVX2"):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulated_amp_warning(args, device):
    """The warning for --amp where bfloat16 runs emulated on the CPU, or None."""
    if not args.amp or device.type != "cpu" or cpu_has_native_bfloat16():
        return None
    return (
        f"--amp on a CPU without native bfloat16 "
        f"({torch.backends.cpu.get_cpu_capability()}): bfloat16 is emulated, a step "
        "takes many times as long as in float32 (measured in docs/precision.md); drop "
        "--amp on this machine"
    )


def knn_monitor(encoder, args, plan, env, epoch, log):
    """kNN accuracy of the query encoder, printed and logged."""
    options = plan.knn
    acc = knn_accuracy(
        encoder,
        args.data,
        env,
        options,
        plan.batch_size,
        plan.workers,
        args.skip_bad_images,
    )
    logger.info(
        f" * kNN Acc@1 {acc:.2f} (epoch {epoch}, {options.features} features, "
        f"k {options.k}, t {options.t})"
    )
    record = {"kind": "knn", "epoch": epoch, "knn_acc1": acc}
    log.log({**record, "features": options.features}, step=epoch + 1)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
