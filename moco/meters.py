"""Meters of a training or validation loop, accuracy, and the metric log."""

import json

import torch

from moco.utils import logger


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

    def state(self):
        """What a mid-epoch checkpoint keeps: the running sum and count."""
        return [self.sum, self.count]

    def load_state(self, state):
        self.sum, self.count = state
        self.avg = self.sum / max(self.count, 1)

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


def record_step(meters, output, target, loss_value, n):
    """
    The step's top-1 and top-5 accuracy of `output` and its loss into `meters` (loss,
    top-1, top-5 AverageMeters), each weighted by `n` images.
    """
    losses, top1, top5 = meters
    acc1, acc5 = accuracy(output, target, topk=(1, 5))
    losses.update(loss_value, n)
    top1.update(acc1, n)
    top5.update(acc5, n)


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
