"""Helpers shared by the scripts: errors, seeding, logging, learning-rate schedules."""

import logging
import math
import random
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.backends.cudnn as cudnn

logger = logging.getLogger("moco")


class UsageError(Exception):
    """A problem the user can fix (argument, data, file): reported as one line, exit 2."""


class NonFiniteLossError(Exception):
    """The loss became NaN or infinite: training stopped before the update, exit 2."""

    def at(self, epoch: int, step: int, output_dir: str) -> "NonFiniteLossError":
        """The same error, saying where it happened and what is left."""
        return NonFiniteLossError(
            f"{self} at epoch {epoch} step {step}; stopped without saving (the last "
            f"checkpoint in {output_dir!r} is intact). Try a lower --lr or "
            "--amp-dtype bfloat16"
        )


# reported as one line and exit status 2, in every process
ONE_LINE_ERRORS = (UsageError, NonFiniteLossError)


def seed_everything(seed: int | None) -> None:
    """
    Seed Python, NumPy and torch when `seed` is given; convolution algorithms are then
    deterministic, else the fastest (cudnn.benchmark).
    """
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    cudnn.deterministic = seed is not None
    cudnn.benchmark = seed is None


def setup_logging(rank: int = 0) -> None:
    """Process 0 logs at INFO to stdout; the others only warnings and errors."""
    if logger.handlers:
        logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def one_line(error: BaseException) -> str:
    """The message of an error, one line, also when a loader worker wrapped it."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised by torch.utils.data from a worker
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        text = message if sep and name.split(".")[-1] == type(error).__name__ else last
    return " ".join(text.split())


def learning_rate(
    epoch: float,
    lr: float,
    epochs: int,
    schedule: Sequence[int] = (),
    cos: bool = False,
) -> float:
    """
    The original's schedules, at a (possibly fractional) epoch: cosine from lr to 0
    over `epochs`, or steps of 0.1x at each epoch in `schedule`.
    """
    if cos:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for milestone in schedule:
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer,
    epoch: float,
    lr: float,
    epochs: int,
    schedule: Sequence[int] = (),
    cos: bool = False,
) -> float:
    """Decay the learning rate based on schedule; returns the value set."""
    lr = learning_rate(epoch, lr, epochs, schedule, cos)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr
