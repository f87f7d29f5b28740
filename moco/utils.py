"""Helpers shared by the scripts: errors, meters, accuracy, schedules, logging."""

import json
import logging
import math
import sys

import torch

logger = logging.getLogger("moco")


class UsageError(Exception):
    """A problem the user can fix (argument, data, file): reported as one line, exit 2."""


def setup_logging(rank=0):
    """Process 0 logs at INFO to stdout; the others only warnings and errors."""
    if logger.handlers:
        logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def one_line(error):
    """The message of an error, one line, also when a loader worker wrapped it."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised by torch.utils.data from a worker
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        text = message if sep and name.split(".")[-1] == type(error).__name__ else last
    return " ".join(text.split())


def run_cli(main, parser):
    """Parse arguments and run main(args); a UsageError ends as one line and exit 2."""
    args = parser.parse_args()
    try:
        return main(args)
    except UsageError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


class AverageMeter:
    """Computes and stores the average and current value"""

    def __init__(self, name, fmt=":f"):
        self.name = name
        self.fmt = fmt
        self.reset()

    def reset(self):
        self.val = 0
        self.avg = 0
        self.sum = 0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        fmtstr = "{name} {val" + self.fmt + "} ({avg" + self.fmt + "})"
        return fmtstr.format(**self.__dict__)


class ProgressMeter:
    def __init__(self, num_batches, meters, prefix=""):
        num_digits = len(str(num_batches))
        fmt = "{:" + str(num_digits) + "d}"
        self.batch_fmtstr = "[" + fmt + "/" + fmt.format(num_batches) + "]"
        self.meters = meters
        self.prefix = prefix

    def display(self, batch):
        entries = [self.prefix + self.batch_fmtstr.format(batch)]
        entries += [str(meter) for meter in self.meters]
        logger.info("\t".join(entries))


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent (Python floats); k is capped at the number of classes."""
    with torch.no_grad():
        maxk = min(max(topk), output.shape[1])
        batch_size = target.size(0)

        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))

        res = []
        for k in topk:
            correct_k = correct[: min(k, maxk)].reshape(-1).float().sum()
            res.append(correct_k.item() * 100.0 / batch_size)
        return res


def learning_rate(epoch, lr, epochs, schedule=(), cos=False):
    """
    The original's schedules, at a (possibly fractional) epoch: cosine from lr to 0
    over `epochs`, or steps of 0.1x at each epoch in `schedule`.
    """
    if cos:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for milestone in schedule:
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


def adjust_learning_rate(optimizer, epoch, args):
    """Decay the learning rate based on schedule; returns the value set."""
    lr = learning_rate(
        epoch, args.lr, args.epochs, args.schedule, getattr(args, "cos", False)
    )
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr


class JsonLogger:
    """One JSON object per line in `path` (and TensorBoard scalars when installed)."""

    def __init__(self, path, enabled=True, tensorboard_dir=None):
        self.path = path if enabled else None
        self.tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, record, step=None):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)
            self.tb.flush()
