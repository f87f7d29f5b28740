"""Meters of a training or validation loop, accuracy, and the metric log."""

import json
import time
from collections.abc import Sequence

import torch

from moco.distributed import all_reduce_sum
from moco.utils import logger


class AverageMeter:
    """Computes and stores the average and current value"""

    def __init__(self, name: str, fmt: str = ":f") -> None:
        self.name = name
        self.fmt = fmt
        self.reset()

    def reset(self) -> None:
        self.val: float = 0
        self.avg: float = 0
        self.sum: float = 0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def state(self) -> list[float]:
        """What a mid-epoch checkpoint keeps: the running sum and count."""
        return [self.sum, self.count]

    def load_state(self, state: Sequence) -> None:
        self.sum, self.count = state
        self.avg = self.sum / max(self.count, 1)

    def __str__(self) -> str:
        fmtstr = "{name} {val" + self.fmt + "} ({avg" + self.fmt + "})"
        return fmtstr.format(**self.__dict__)


class ProgressMeter:
    def __init__(
        self, num_batches: int, meters: Sequence[AverageMeter], prefix: str = ""
    ) -> None:
        num_digits = len(str(num_batches))
        fmt = "{:" + str(num_digits) + "d}"
        self.batch_fmtstr = "[" + fmt + "/" + fmt.format(num_batches) + "]"
        self.meters = meters
        self.prefix = prefix

    def display(self, batch: int) -> None:
        entries = [self.prefix + self.batch_fmtstr.format(batch)]
        entries += [str(meter) for meter in self.meters]
        logger.info("\t".join(entries))


def correct_counts(
    output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)
) -> torch.Tensor:
    """
    How many rows of `output` rank their target within the top k, for each k, as one
    float tensor on output's device: read to the host once with the step's other values.
    """
    with torch.no_grad():
        maxk = min(max(topk), output.shape[1])
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand(maxk, -1))
        return torch.stack([correct[: min(k, maxk)].sum() for k in topk]).float()


def read_step(
    loss: torch.Tensor,
    output: torch.Tensor,
    target: torch.Tensor,
    flags: torch.Tensor | None = None,
) -> tuple[float, ...]:
    """
    (loss, top-1 %, top-5 %) of a step as Python floats, then the values of `flags`
    (a 1-d tensor on the same device) if given, in one host read: on a GPU each read
    waits for the device, so a step makes one.
    """
    counts = correct_counts(output, target, (1, 5))
    values = [loss.detach().float().view(1), counts]
    if flags is not None:
        values.append(flags.float())
    loss_value, correct1, correct5, *rest = torch.cat(values).tolist()
    rows = target.size(0)
    return (loss_value, correct1 * 100.0 / rows, correct5 * 100.0 / rows, *rest)


class TrainMeters:
    """
    The meters of a training epoch (time, data time, loss, Acc@1, Acc@5), its progress
    lines and its step and epoch records. One object serves every epoch of a run: its
    state (the sums of the averaged meters) is what a mid-epoch checkpoint keeps, and
    an epoch resumed within goes on from it.
    """

    def __init__(
        self, epoch: int = 0, total: int = 0, world_size: int = 1, epochs: int = 1
    ) -> None:
        # the run's processes and epochs, for its speed and the time left
        self.world_size, self.epochs = world_size, epochs
        self.batch_time = AverageMeter("Time", ":6.3f")
        self.data_time = AverageMeter("Data", ":6.3f")
        self.losses = AverageMeter("Loss", ":.4e")
        self.top1 = AverageMeter("Acc@1", ":6.2f")
        self.top5 = AverageMeter("Acc@5", ":6.2f")
        self.start(epoch, total)

    def start(self, epoch: int, total: int, first: int = 0) -> None:
        """
        Epoch `epoch` of `total` steps begins at step `first`: from zero, or (first > 0,
        resumed) from the sums that load_state_dict restored.
        """
        self.epoch, self.total, self.first = epoch, total, first
        self.progress = ProgressMeter(
            total,
            [self.batch_time, self.data_time, self.losses, self.top1, self.top5],
            prefix=f"Epoch: [{epoch}]",
        )
        for meter in (self.batch_time, self.data_time):
            meter.reset()
        if not first:
            for meter in self.averaged:
                meter.reset()
        self.images_before = self.losses.count
        self.n = 0  # the last step's samples
        self.begin = self.end = time.time()

    @property
    def averaged(self) -> tuple[AverageMeter, AverageMeter, AverageMeter]:
        """The meters whose sums a mid-epoch checkpoint keeps."""
        return (self.losses, self.top1, self.top5)

    def state_dict(self) -> dict:
        """{meter name: [sum, count]} of the averaged meters."""
        return {meter.name: meter.state() for meter in self.averaged}

    def load_state_dict(self, state: dict) -> None:
        """Go on from what state_dict returned (start then keeps it, first > 0)."""
        for meter in self.averaged:
            if meter.name in state:
                meter.load_state(state[meter.name])

    def loaded(self) -> None:
        """A batch arrived from the loader."""
        self.data_time.update(time.time() - self.end)

    def update(self, loss: float, acc1: float, acc5: float, n: int) -> None:
        """A step done: its loss and top-1/top-5 accuracy (%), weighted by `n`."""
        self.n = n
        self.losses.update(loss, n)
        self.top1.update(acc1, n)
        self.top5.update(acc5, n)
        self.batch_time.update(time.time() - self.end)
        self.end = time.time()

    def step_record(self, step: int, lr: float) -> dict:
        """The progress line of `step`, printed, and its log record."""
        self.progress.display(step)
        done = step + 1 - self.first
        return {
            "kind": "step",
            "epoch": self.epoch,
            "step": step,
            "global_step": self.epoch * self.total + step,
            "loss": self.losses.val,
            "acc1": self.top1.val,
            "acc5": self.top5.val,
            "lr": lr,
            "images_per_s": self.n * self.world_size / max(self.batch_time.val, 1e-9),
            "data_share": self.data_time.sum / max(self.batch_time.sum, 1e-9),
            "epoch_eta_s": (self.end - self.begin) / done * (self.total - step - 1),
        }

    def epoch_record(self, lr: float) -> dict:
        """The epoch's averages and speed, as logged after its last step."""
        elapsed = time.time() - self.begin
        trained = self.losses.count - self.images_before
        return {
            "kind": "epoch",
            "epoch": self.epoch,
            "loss": self.losses.avg,
            "acc1": self.top1.avg,
            "acc5": self.top5.avg,
            "lr": lr,
            "epoch_time_s": elapsed,
            "images_per_s": trained * self.world_size / max(elapsed, 1e-9),
            "data_share": self.data_time.sum / max(self.batch_time.sum, 1e-9),
            "eta_s": elapsed * (self.epochs - self.epoch - 1),
        }


class ValidationMeters(TrainMeters):
    """
    The meters of a validation pass: TrainMeters' time, loss and accuracies, shown as
    the original's validate shows them ('Test: ', no data time).
    """

    def __init__(self, total: int) -> None:
        super().__init__(0, total)
        self.progress = ProgressMeter(
            total, [self.batch_time, self.losses, self.top1, self.top5], prefix="Test: "
        )

    def totals(self) -> list[float]:
        """This process's [top-1 count, top-5 count, loss sum, images]."""
        # the meters hold percentages of counts
        return [
            round(self.top1.sum / 100),
            round(self.top5.sum / 100),
            self.losses.sum,
            self.losses.count,
        ]


def accuracy_report(totals: torch.Tensor, shown: bool = True) -> dict:
    """
    The validation figures from this process's float64 [top-1 count, top-5 count,
    loss sum, images], summed over every process's (collective): ' * Acc@1 .. Acc@5 ..'
    printed if `shown`, and val_acc1, val_acc5, val_loss and val_images returned.
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


def epoch_record(
    epoch: int, lr: float, train_stats: dict, val_stats: dict, best_acc1: float
) -> dict:
    """A linear classifier's `epoch` record: its training and validation figures."""
    return {
        "kind": "epoch",
        "epoch": epoch,
        "lr": lr,
        **train_stats,
        **val_stats,
        "best_acc1": best_acc1,
    }


class JsonLogger:
    """One JSON object per line in `path` (and TensorBoard scalars when installed)."""

    def __init__(
        self, path: str, enabled: bool = True, tensorboard_dir: str | None = None
    ) -> None:
        self.path = path if enabled else None
        self.tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict, step: int | None = None) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)
            self.tb.flush()
