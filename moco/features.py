"""Features of a frozen encoder over a set of images: what kNN and the linear probe use.

Each process extracts its contiguous share of the set (moco.distributed.shard_range:
every sample once, whatever the number of processes). The features are written into
one tensor allocated at the first batch, and a set gathered on every process is
gathered into that same tensor: extraction peaks at the features' own size plus one
batch (its images, activations and outputs), never at a list of batches beside their
concatenation.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from moco.distributed import (
    DistEnv,
    broadcast_shares_,
    ignore_stop_signals,
    shard_range,
)
from moco.utils import UsageError

HEADS = ("fc", "classifier", "heads", "head")  # torchvision's names of the last layers


@dataclass
class Features:
    """
    The features of rows start .. start + len(x) of a set of images, [n, D], and the
    labels of all of its N samples, [N].
    """

    x: torch.Tensor
    y: torch.Tensor
    start: int = 0


def backbone(encoder: nn.Module) -> nn.Module:
    """A copy of `encoder` without its head, in eval mode: its output is the features."""
    model = copy.deepcopy(encoder)  # of a torch.compile'd module: an eager copy
    for name in HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
            return model.eval()
    raise UsageError(
        f"cannot find the head of {type(encoder).__name__} (one of {HEADS})"
    )


def share_loader(
    dataset: Dataset, env: DistEnv, batch_size: int, workers: int
) -> DataLoader:
    """This process's contiguous share of `dataset`, in order."""
    rows = shard_range(len(dataset), env.rank, env.world_size)  # type: ignore[arg-type]
    return DataLoader(
        Subset(dataset, rows),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        # the loader's own seed: measuring between epochs leaves training's draws alone
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )


@torch.no_grad()
def extract(
    model: nn.Module,
    dataset: Dataset,
    env: DistEnv,
    batch_size: int,
    workers: int,
    everywhere: bool = True,
    normalize: bool = False,
) -> Features:
    """
    The outputs of `model` (float32, flattened; L2-normalised if `normalize`) for the
    samples of `dataset`, in order, on env.device: of every sample on every process
    (`everywhere`), else of this process's share; the labels of every sample on every
    process. Collective: call it on every process.
    """
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    share = shard_range(n, env.rank, env.world_size)
    rows = range(n) if everywhere else share
    x = None
    # on the host until the last batch: one copy to the device, not one per batch
    labels = torch.empty(n, dtype=torch.long)
    at = share.start
    for images, target in share_loader(dataset, env, batch_size, workers):
        out = model(images.to(env.device, non_blocking=True)).flatten(1).float()
        if normalize:
            out = F.normalize(out, dim=1)
        if x is None:
            x = out.new_empty(len(rows), out.shape[1])
        x[at - rows.start : at - rows.start + len(out)] = out
        labels[at : at + len(out)] = target
        at += len(out)
    if x is None:  # a process without a share of a tiny set: [0 or N, D] all the same
        sample = dataset[0][0].unsqueeze(0).to(env.device)
        x = torch.empty(len(rows), model(sample).flatten(1).shape[1], device=env.device)
    if everywhere:
        broadcast_shares_(x)
    return Features(x, broadcast_shares_(labels.to(env.device)), rows.start)
