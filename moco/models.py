"""Backbones: torchvision classification models, a small-image stem, split BatchNorm."""

import functools
from typing import Any

import torch
import torch.nn as nn
import torchvision

from moco.utils import UsageError


@functools.cache
def model_names() -> tuple[str, ...]:
    """The torchvision classification models (no helpers such as get_model)."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def check_arch(arch: str, mlp: bool = False, small_stem: bool = False) -> None:
    """Refuse an architecture that cannot be used, with a message saying why."""
    if arch not in model_names():
        raise UsageError(
            f"unknown --arch {arch!r}; choose a torchvision classification model such as "
            "resnet18 or resnet50 (see --help for the list)"
        )
    if mlp or small_stem:
        model = torchvision.models.get_model(arch, num_classes=8)
        if mlp and not isinstance(getattr(model, "fc", None), nn.Linear):
            raise UsageError(
                f"--mlp needs an architecture with an 'fc' layer; {arch} has none"
            )
        if small_stem and not (
            isinstance(getattr(model, "conv1", None), nn.Conv2d)
            and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d)
        ):
            raise UsageError(
                f"--small-stem needs a ResNet (conv1 and maxpool); {arch} is not one"
            )


class SplitBatchNorm(nn.BatchNorm2d):
    """
    BatchNorm2d whose training-mode statistics are taken over `num_splits` groups of
    the batch, as `num_splits` GPUs would; running statistics are the mean over the
    groups, and the state_dict names are BatchNorm2d's. Group j holds the samples
    j, j + num_splits, ... (as in the official CIFAR-10 demo); the key shuffle makes
    the grouping random.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training or not self.track_running_stats) or self.num_splits == 1:
            return super().forward(input)
        # the groups' statistics go into running averages, which need both
        assert (
            self.running_mean is not None
            and self.running_var is not None
            and self.num_batches_tracked is not None
            and self.momentum is not None
        ), "SplitBatchNorm needs track_running_stats=True and a float momentum"
        N, C, H, W = input.shape
        if N % self.num_splits:
            raise ValueError(
                f"batch of {N} does not split into {self.num_splits} BatchNorm groups"
            )
        running_mean = self.running_mean.repeat(self.num_splits)
        running_var = self.running_var.repeat(self.num_splits)
        out = nn.functional.batch_norm(
            input.reshape(-1, C * self.num_splits, H, W),
            running_mean,
            running_var,
            self.weight.repeat(self.num_splits),
            self.bias.repeat(self.num_splits),
            True,
            self.momentum,
            self.eps,
        ).view(N, C, H, W)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(self.num_splits, C).mean(dim=0))
            self.running_var.copy_(running_var.view(self.num_splits, C).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return out


def _split_batchnorm(module: nn.Module, num_splits: int) -> None:
    """Swap every BatchNorm2d for a SplitBatchNorm holding the same tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm(
                child.num_features,
                num_splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            _split_batchnorm(child, num_splits)


def build_encoder(
    arch: str, num_classes: int = 1000, small_stem: bool = False, bn_splits: int = 1
) -> nn.Module:
    """
    A torchvision model, built exactly as torchvision.models.__dict__[arch](num_classes)
    (same use of the random number generator), then optionally:
    small_stem: the CIFAR recipe of the official demo: conv1 3x3 stride 1, no max-pool
    bn_splits: SplitBatchNorm with this many groups
    """
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    if small_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    if bn_splits > 1:
        _split_batchnorm(model, bn_splits)
    return model
