"""
Augmentations: the original's MoCo v1 and v2 recipes and the official CIFAR-10 demo's,
and the evaluation transforms. moco/fast_augment.py runs the same recipes with the same
random draws through faster operations (`--aug-impl fast`, the default).
"""

import torch
import torchvision.transforms as transforms
from PIL import ImageFilter

from moco.fast_augment import FastTwoCrops
from moco.utils import UsageError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# the official CIFAR-10 demo's
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2023, 0.1994, 0.2010]
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
}

RECIPES = ("v1", "v2", "cifar10")
# per image in the loader workers (pretrain_transform)
TRANSFORM_IMPLS = ("fast", "original")
# and in batches on the training device (moco/batch_augment.py)
AUG_IMPLS = TRANSFORM_IMPLS + ("batched",)


class TwoCropsTransform:
    """Take two random crops of one image as the query and key."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        q = self.base_transform(x)
        k = self.base_transform(x)
        return [q, k]


class GaussianBlur:
    """Gaussian blur augmentation in SimCLR https://arxiv.org/abs/2002.05709"""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        # torch's generator, like every other random choice of the pipeline
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


def check_recipe(recipe):
    if recipe not in RECIPES:
        raise UsageError(f"unknown augmentation {recipe!r}; use one of {RECIPES}")


def pretrain_augmentation(recipe="v1", size=224, normalize="imagenet"):
    """One crop's augmentation of a recipe: "v1", "v2" (--aug-plus) or "cifar10"."""
    mean, std = normalization(normalize)
    normalize = transforms.Normalize(mean=mean, std=std)
    if recipe == "v1":
        # MoCo v1's aug: the same as InstDisc https://arxiv.org/abs/1805.01978
        augmentation = [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
        ]
    elif recipe == "v2":
        # MoCo v2's aug: similar to SimCLR https://arxiv.org/abs/2002.05709
        # (the colour jitter is not strengthened)
        augmentation = [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
            transforms.RandomHorizontalFlip(),
        ]
    elif recipe == "cifar10":
        # the official CIFAR-10 demo's: v2's colour without blur, the default crop scale
        augmentation = [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ]
    else:
        check_recipe(recipe)
    return transforms.Compose(augmentation + [transforms.ToTensor(), normalize])


def pretrain_transform(recipe="v1", size=224, impl="original", normalize="imagenet"):
    """
    Image -> [query crop, key crop] of a recipe. impl "original" runs the transforms
    above, "fast" the same recipe with the same random draws (moco/fast_augment.py).
    """
    if impl == "original":
        return TwoCropsTransform(pretrain_augmentation(recipe, size, normalize))
    if impl == "fast":
        check_recipe(recipe)
        return FastTwoCrops(recipe, size, *normalization(normalize))
    raise UsageError(
        f"unknown augmentation implementation {impl!r}; use one of {TRANSFORM_IMPLS}"
    )


def eval_transforms(size=224, normalize="imagenet", center_crop=True):
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


def normalization(name):
    """(mean, std) of a named normalisation."""
    if name not in NORMALIZATIONS:
        raise UsageError(
            f"unknown normalisation {name!r}; use one of {tuple(NORMALIZATIONS)}"
        )
    return NORMALIZATIONS[name]
