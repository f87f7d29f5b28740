"""The quick linear probe: features extracted once, the linear classifier trained on them.

main_lincls.py's protocol passes augmented crops through the frozen encoder at every
one of its 100 epochs. With --cached-features it takes instead:
1. the backbone's features of every image of DIR/train and DIR/val, extracted once
   under the validation transform (resize, centre crop; no augmentation): each process
   extracts its contiguous share of each set and the shares are gathered, so every
   process holds all features, N x D float32 values per set (moco/features.py: no more
   than that and one batch at any time);
2. the features standardised with the mean and standard deviation of the training
   features (BatchNorm without affine parameters, statistics of the whole set): the
   scale of raw features differs from encoder to encoder (a random encoder's BatchNorm
   keeps its initial statistics), standardised ones let one learning rate, PROBE_LR,
   serve every encoder;
3. SGD on the standardised features in mini-batches of the global batch, shuffled by
   a seeded generator: every process trains the same classifier on the same batches;
4. the classifier with the standardisation folded into its weights (fold): a linear
   layer on the raw backbone features, the fc of the original's checkpoint format.
"""

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moco.data import SeededImageFolder
from moco.distributed import DistEnv, get_world_size, shard_range
from moco.features import Features, backbone, extract
from moco.meters import JsonLogger, accuracy_report, correct_counts, epoch_record
from moco.utils import adjust_learning_rate, logger

# the default --lr on standardised features
PROBE_LR = 0.01
# added to the variance (as BatchNorm's eps): a feature that never varies stays 0
EPS = 1e-6


def share_from_first_process(module: nn.Module) -> None:
    """Every tensor of `module`'s state set to process 0's (nothing with one process)."""
    if get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def extract_splits(
    encoder: nn.Module,
    data_dir: str,
    env: DistEnv,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    workers: int,
    skip_bad: bool = False,
) -> tuple[Features, Features]:
    """
    The backbone features of DATA/train and DATA/val under `transform`, each image once.
    Collective: call it on every process; each gets all features of both sets.
    """
    model = backbone(encoder).to(env.device)
    train_set = SeededImageFolder(
        os.path.join(data_dir, "train"), transform, skip_bad=skip_bad
    )
    # every validation image counts: an unreadable one is an error, not skipped
    val_set = SeededImageFolder(os.path.join(data_dir, "val"), transform)
    train = extract(model, train_set, env, batch_size, workers)
    val = extract(model, val_set, env, batch_size, workers)
    return train, val


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each feature (column) of `x`, [D] each."""
    var, mean = torch.var_mean(x, dim=0, correction=0)
    return mean, (var + EPS).sqrt()


def standardize_(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """x = (x - mean) / std, feature by feature, in place: no second copy of a large set."""
    return x.sub_(mean).div_(std)


def fold(fc: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """
    The linear layer on raw features equal to `fc` on standardised ones:
    W (x - mean) / std + b = (W / std) x + (b - (W / std) mean).
    """
    weight = fc.weight.detach() / std
    folded = nn.Linear(fc.in_features, fc.out_features).to(weight.device)
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(fc.bias.detach() - weight @ mean)
    return folded


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """
    A shuffled order of `n` samples cut into mini-batches (the last may be smaller),
    drawn on the host by `generator` and copied to `device` once.
    """
    return torch.randperm(n, generator=generator).to(device).split(batch_size)


def train_epoch(
    fc: nn.Linear,
    optimizer: torch.optim.Optimizer,
    train: Features,
    batch_size: int,
    generator: torch.Generator,
) -> dict:
    """
    One epoch of SGD of `fc` over `train` (standardised features) in the mini-batches
    of `generator`'s shuffle; returns the epoch's mean loss and top-1/top-5 (%).
    """
    # loss sum, top-1 and top-5 counts: read once, after the epoch
    sums = torch.zeros(3, dtype=torch.float64, device=train.x.device)
    for index in batches(train.x.shape[0], batch_size, generator, train.x.device):
        target = train.y[index]
        output = fc(train.x[index])
        loss = F.cross_entropy(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counts = correct_counts(output.detach(), target, (1, 5))
        sums += torch.cat([loss.detach().view(1) * len(index), counts]).double()
    loss_sum, correct1, correct5 = sums.tolist()
    n = max(train.x.shape[0], 1)
    return {
        "loss": loss_sum / n,
        "acc1": 100 * correct1 / n,
        "acc5": 100 * correct5 / n,
    }


@torch.no_grad()
def validation_sums(fc: nn.Linear, val: Features, env: DistEnv) -> torch.Tensor:
    """
    This process's contiguous share of `val` classified by `fc`: top-1 and top-5
    counts, loss sum and number of images, float64 (summed over processes, every image
    counts once).
    """
    share = shard_range(val.x.shape[0], env.rank, env.world_size)
    x, y = val.x[share.start : share.stop], val.y[share.start : share.stop]
    output = fc(x)
    loss_sum = F.cross_entropy(output, y, reduction="sum") if len(y) else output.sum()
    counts = correct_counts(output, y, (1, 5)).double()
    return torch.cat([counts, loss_sum.double().view(1), counts.new_tensor([len(y)])])


@dataclass
class ProbeResult:
    """The best validation Acc@1, the best epoch and its fc, the last epoch's fc."""

    best_acc1: float
    best: tuple[int, dict[str, torch.Tensor]] | None
    last: dict[str, torch.Tensor]


def fit(
    fc: nn.Linear,
    optimizer: torch.optim.Optimizer,
    train: Features,
    val: Features,
    env: DistEnv,
    *,
    epochs: int,
    lr: float,
    schedule: Sequence[int],
    batch_size: int,
    seed: int,
    print_freq: int,
    log: JsonLogger,
) -> ProbeResult:
    """
    The quick probe's epochs: `fc` trained by `optimizer` on `train`'s features,
    standardised in place, in shuffled mini-batches of `batch_size` (the global
    batch, the same on every process: `seed`); evaluated on `val` after every epoch,
    with the report and the `epoch` records of the protocol on images. The classifiers
    returned have the standardisation folded in: they take raw features.
    """
    mean, std = feature_stats(train.x)
    standardize_(train.x, mean, std)
    generator = torch.Generator().manual_seed(seed)
    best_acc1, best = 0.0, None
    for epoch in range(epochs):
        epoch_lr = adjust_learning_rate(optimizer, epoch, lr, epochs, schedule)
        train_stats = train_epoch(fc, optimizer, train, batch_size, generator)
        shown = epoch % print_freq == 0 or epoch == epochs - 1
        if shown:
            logger.info(
                f"Epoch: [{epoch}] lr {epoch_lr:g} Loss {train_stats['loss']:.4e} "
                f"Acc@1 {train_stats['acc1']:6.2f} Acc@5 {train_stats['acc5']:6.2f} "
                "(training features)"
            )
        folded = fold(fc, mean, std)
        val_stats = accuracy_report(validation_sums(folded, val, env), shown)
        if val_stats["val_acc1"] > best_acc1:
            best = (epoch, folded.state_dict())
        best_acc1 = max(val_stats["val_acc1"], best_acc1)
        log.log(epoch_record(epoch, epoch_lr, train_stats, val_stats, best_acc1))
    if best is not None:
        logger.info(f" * best Acc@1 {best_acc1:.3f} (epoch {best[0]})")
    return ProbeResult(best_acc1, best, folded.state_dict())
