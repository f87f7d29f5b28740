"""
Augmentations: the original's MoCo v1 and v2 recipes and the official CIFAR-10 demo's,
the normalisations and the evaluation transforms.

A recipe is written as the original writes its list of torchvision transforms; each
operation (moco/augment.py) runs in the form that --aug-impl picks, all three drawing
the same random numbers in the same order, so a seed gives the same crops in each:
  - original: the original's torchvision transforms on PIL images, its exact pixels;
  - fast (the default): the same operations per image in the loader workers, with
    fewer conversions: PIL's pixels but for the resize and the blur, within a few grey
    levels (the tests bound each operation);
  - batched (moco/batch_augment.py): the workers read the files and draw; decoding
    and the operations run on batches on the training device.
"""

from collections.abc import Callable, Sequence

import torch
import torchvision.transforms as transforms
from PIL import Image

from moco.augment import (
    ColorJitter,
    GaussianBlur,
    RandomApply,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Recipe,
    as_tensor,
    hue_tables,
)
from moco.utils import UsageError

RECIPES = {
    # MoCo v1's aug: the same as InstDisc https://arxiv.org/abs/1805.01978
    "v1": Recipe(
        RandomResizedCrop(scale=(0.2, 1.0)),
        RandomGrayscale(p=0.2),
        ColorJitter(0.4, 0.4, 0.4, 0.4),
        RandomHorizontalFlip(),
    ),
    # MoCo v2's aug: similar to SimCLR https://arxiv.org/abs/2002.05709
    "v2": Recipe(
        RandomResizedCrop(scale=(0.2, 1.0)),
        RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8),  # not strengthened
        RandomGrayscale(p=0.2),
        RandomApply(GaussianBlur(sigma=(0.1, 2.0)), p=0.5),
        RandomHorizontalFlip(),
    ),
    # the official CIFAR-10 demo's
    "cifar10": Recipe(
        RandomResizedCrop(),
        RandomHorizontalFlip(p=0.5),
        RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8),
        RandomGrayscale(p=0.2),
    ),
}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# the official CIFAR-10 demo's
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2023, 0.1994, 0.2010]
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
}

# per image in the loader workers (pretrain_transform)
TRANSFORM_IMPLS = ("fast", "original")
# and in batches on the training device (moco/batch_augment.py)
AUG_IMPLS = TRANSFORM_IMPLS + ("batched",)


def get_recipe(name: str) -> Recipe:
    """The recipe of a name, or a UsageError."""
    if name not in RECIPES:
        raise UsageError(f"unknown augmentation {name!r}; use one of {tuple(RECIPES)}")
    return RECIPES[name]


def normalization(name: str) -> tuple[list[float], list[float]]:
    """(mean, std) of a named normalisation."""
    if name not in NORMALIZATIONS:
        raise UsageError(
            f"unknown normalisation {name!r}; use one of {tuple(NORMALIZATIONS)}"
        )
    return NORMALIZATIONS[name]


class TwoCropsTransform:
    """Take two random crops of one image as the query and key."""

    def __init__(self, base_transform: Callable[[Image.Image], torch.Tensor]):
        self.base_transform = base_transform

    def __call__(self, x: Image.Image) -> list[torch.Tensor]:
        q = self.base_transform(x)
        k = self.base_transform(x)
        return [q, k]


class FastTwoCrops:
    """
    Image -> [query crop, key crop] of a recipe, normalised with `mean` and `std`:
    the original's draws, each operation's fast form.
    """

    def __init__(
        self, recipe: str, size: int, mean: Sequence[float], std: Sequence[float]
    ):
        self.recipe = get_recipe(recipe)
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        # built once here, shared by forked loader workers
        hue_tables(torch.device("cpu"))

    def sample(self, img: Image.Image) -> list:
        """One crop's draws (Recipe.draw)."""
        return self.recipe.draw(img)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return self.apply(img, [self.sample(img), self.sample(img)])

    def apply(self, img: Image.Image, drawn: Sequence[list]) -> list[torch.Tensor]:
        """The crops of `img` for the given draws: [3, size, size] floats each."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        x = as_tensor(img)
        out = torch.empty(len(drawn), 3, self.size, self.size)
        for k, d in enumerate(drawn):
            out[k].copy_(self.recipe.image(x, d, self.size))
        # ToTensor's and Normalize's float operations, for both crops at once
        out.div_(255).sub_(self.mean).div_(self.std)
        return list(out)


def pretrain_transform(
    recipe: str = "v1",
    size: int = 224,
    impl: str = "original",
    normalize: str = "imagenet",
) -> Callable[[Image.Image], list[torch.Tensor]]:
    """
    Image -> [query crop, key crop] of a recipe ("v1", "v2" as --aug-plus, or
    "cifar10"): impl "original" the original's TwoCropsTransform of torchvision
    transforms, "fast" FastTwoCrops.
    """
    mean, std = normalization(normalize)
    if impl == "original":
        augmentation = get_recipe(recipe).transform(size)
        augmentation += [transforms.ToTensor(), transforms.Normalize(mean, std)]
        return TwoCropsTransform(transforms.Compose(augmentation))
    if impl == "fast":
        return FastTwoCrops(recipe, size, mean, std)
    raise UsageError(
        f"unknown augmentation implementation {impl!r}; use one of {TRANSFORM_IMPLS}"
    )


def eval_transforms(
    size: int = 224, normalize: str = "imagenet", center_crop: bool = True
) -> tuple[transforms.Compose, transforms.Compose]:
    """
    The linear probe's (train, val) transforms. val resizes to size * 256 / 224 and
    takes the centre crop; without center_crop it keeps each image as it is (32-px
    CIFAR images at their own size, as the CIFAR-10 demo's kNN monitor).
    """
    normalize = transforms.Normalize(*normalization(normalize))
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    resize = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    val = transforms.Compose(
        (resize if center_crop else []) + [transforms.ToTensor(), normalize]
    )
    return train, val
