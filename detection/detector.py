"""Faster R-CNN R50-FPN from torchvision, its ResNet-50 read from a MoCo checkpoint.

Set up as the paper's detectron2 configs set a self-supervised backbone: BatchNorm
trained (SyncBatchNorm across GPU processes) instead of torchvision's frozen BN, every
stage trainable, the input normalised as MoCo's was (RGB, ImageNet mean and std), no
weight decay on BatchNorm's scale and shift (detectron2's WEIGHT_DECAY_NORM 0).
"""

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

# the one use of the converter's checkpoint reading: every flavour it reads
from detection.convert import read_backbone
from moco.checkpoint import CheckpointError, load_checkpoint
from moco.loader import normalization

ARCH = "fasterrcnn_resnet50_fpn"
# the stem's kernel, the blocks of layer1..4 and the width of layer1's first conv
RESNET50 = ((7, 7), (3, 4, 6, 3), 64)


def read_resnet50(path: str, what: str = "--pretrained") -> dict[str, torch.Tensor]:
    """
    The ResNet-50 of a checkpoint of any flavour the converter reads, with
    torchvision's names, fc left out; a one-line CheckpointError for anything else.
    """
    backbone = read_backbone(load_checkpoint(path, what=what), path)
    sd = backbone.state_dict
    found = (
        tuple(sd["conv1.weight"].shape[-2:]),
        backbone.blocks,
        sd["layer1.0.conv1.weight"].shape[0] if backbone.bottleneck else 0,
    )
    if found != RESNET50:
        raise CheckpointError(
            f"{what} {path!r} holds {backbone.describe()}, with a "
            f"{found[0][0]}x{found[0][1]} stem and {found[2] or 'no'} bottleneck "
            "channels in layer1; the detector's backbone is torchvision's resnet50 "
            "(7x7 stem, bottleneck blocks 3-4-6-3, 64 channels in layer1)"
        )
    return sd


def load_backbone(
    model: FasterRCNN, state_dict: dict[str, torch.Tensor], path: str
) -> int:
    """
    Copy the ResNet-50 `state_dict` into the detector's backbone, every tensor of it:
    missing, unexpected or differently shaped tensors are a one-line CheckpointError.
    BatchNorm step counters absent from old files start at 0. Returns the number of
    tensors loaded.
    """
    body = model.backbone.body
    own = body.state_dict()
    counters = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    try:
        body.load_state_dict({**counters, **state_dict}, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(
            f"--pretrained {path!r} does not fit torchvision's resnet50 (a ResNeXt or "
            f"wide ResNet?): {detail[:200]}"
        ) from None
    loaded = body.state_dict()
    assert all(
        torch.equal(loaded[k], v.to(loaded[k].device)) for k, v in state_dict.items()
    )
    return len(state_dict)


def build_detector(num_classes: int, **options: Any) -> FasterRCNN:
    """
    torchvision's Faster R-CNN R50-FPN with `num_classes` outputs (the background
    included), every weight random: the backbone's come from load_backbone. options:
    FasterRCNN's (min_size, max_size, rpn_*, box_*).
    """
    mean, std = normalization("imagenet")
    # no weights: nothing is downloaded, BatchNorm is trained and every stage trains
    model = fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        image_mean=mean,
        image_std=std,
        **options,
    )
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    return model


def sync_batchnorm(model: FasterRCNN, distributed: bool, device: torch.device) -> bool:
    """
    Make every BatchNorm a SyncBatchNorm, in place, when processes train together on
    GPUs (the paper's SyncBN: statistics over the whole batch, not 2 images of one
    GPU); torch synchronises only on GPUs. Returns whether it did.
    """
    if not (distributed and device.type == "cuda"):
        return False
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return True


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD's groups: BatchNorm's weight and bias without weight decay, as detectron2."""
    norm, other = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        (norm if is_norm else other).extend(params)
    return [
        {"params": other, "weight_decay": weight_decay},
        {"params": norm, "weight_decay": 0.0},
    ]


def learning_rate(
    it: int,
    base_lr: float,
    steps: tuple[int, ...] | list[int],
    warmup_iters: int,
    warmup_factor: float = 0.001,
) -> float:
    """
    detectron2's WarmupMultiStepLR at iteration `it`: x0.1 at each of `steps`, and in
    the first `warmup_iters` a factor rising linearly from warmup_factor to 1.
    """
    lr = base_lr * 0.1 ** sum(it >= s for s in steps)
    if it < warmup_iters:
        alpha = it / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


@torch.no_grad()
def precise_bn(
    model: FasterRCNN,
    batches: Iterator[tuple[list[torch.Tensor], Any]],
    iters: int,
    device: torch.device,
) -> None:
    """
    Replace BatchNorm's running statistics by the mean of `iters` training batches'
    (detectron2's PreciseBN): the running averages trail weights that moved while they
    were taken. The batches go through the detector's own resizing and normalisation;
    with SyncBatchNorm the statistics are those of every process's images.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    momenta = [bn.momentum for bn in norms]
    training = model.training
    model.train()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    for _ in range(iters):
        images, _ = next(batches)
        batch, _ = model.transform([im.to(device) for im in images])
        model.backbone(batch.tensors)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.train(training)
