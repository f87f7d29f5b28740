"""
Augmentations: the original's MoCo v1 and v2 recipes and the official CIFAR-10 demo's,
each defined once, as data (RECIPES), and the evaluation transforms.

Three implementations read a recipe and draw the same random numbers in the same order,
so a seed gives the same crop boxes, jitter order and factors, grayscale, blur sigma and
flip in each:
  - `--aug-impl fast` (moco/fast_augment.py) runs by default: the same recipe and draws
    as the original's transforms, per image in the loader workers, through faster
    operations, so the same crops cost less; its pixels are within a few grey levels of
    the original's (the colour operations are PIL's, bit for bit; torch's resize and
    the blur without PIL's rounding after each pass are a level or so apart);
  - `--aug-impl original` (pretrain_augmentation below): the original's torchvision
    transforms on PIL images, for its exact pixels;
  - `--aug-impl batched` (moco/batch_augment.py): the workers read the files and draw
    the parameters; decoding and the recipe run on batches on the training device.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.transforms as transforms
from PIL import Image, ImageFilter

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

# the operations a recipe applies after its crop, in an order of its own
OPERATIONS = ("gray", "jitter", "blur", "flip")


@dataclass(frozen=True)
class Recipe:
    """
    An augmentation recipe: RandomResizedCrop, then the operations of `order`. Each
    operation draws as its torchvision transform does: grayscale and flip a
    torch.rand(1) each (RandomGrayscale, RandomHorizontalFlip); jitter and blur one
    inside RandomApply, or none with probability 1 (the transform on its own).
    """

    # RandomResizedCrop's ranges of the crop's area (a fraction of the image's) and of
    # its aspect ratio
    scale: tuple[float, float]
    # the OPERATIONS after the crop, in the order they run
    order: tuple[str, ...]
    # ColorJitter's brightness, contrast, saturation and hue, each above 0
    jitter: tuple[float, float, float, float]
    jitter_p: float
    gray_p: float
    flip_p: float
    blur_p: float = 0.0
    # the range of the Gaussian blur's sigma, drawn uniformly
    blur_sigma: tuple[float, float] | None = None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        assert set(self.order) <= set(OPERATIONS), self.order
        assert len(set(self.order)) == len(self.order), self.order
        assert ("blur" in self.order) == (self.blur_p > 0) == bool(self.blur_sigma)
        assert all(s > 0 for s in self.jitter), self.jitter
        if "blur" in self.order:
            # the fast paths blur the normalised crop, after its colour operations
            later = self.order[self.order.index("blur") :]
            assert "gray" not in later and "jitter" not in later, self.order


RECIPES = {
    # MoCo v1's aug: the same as InstDisc https://arxiv.org/abs/1805.01978
    "v1": Recipe(
        scale=(0.2, 1.0),
        order=("gray", "jitter", "flip"),
        jitter=(0.4, 0.4, 0.4, 0.4),
        jitter_p=1.0,
        gray_p=0.2,
        flip_p=0.5,
    ),
    # MoCo v2's aug: similar to SimCLR https://arxiv.org/abs/2002.05709
    # (the colour jitter is not strengthened)
    "v2": Recipe(
        scale=(0.2, 1.0),
        order=("jitter", "gray", "blur", "flip"),
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        gray_p=0.2,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
        flip_p=0.5,
    ),
    # the official CIFAR-10 demo's: v2's colour without blur, the default crop scale
    "cifar10": Recipe(
        scale=(0.08, 1.0),
        order=("flip", "jitter", "gray"),
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        gray_p=0.2,
        flip_p=0.5,
    ),
}
# per image in the loader workers (pretrain_transform)
TRANSFORM_IMPLS = ("fast", "original")
# and in batches on the training device (moco/batch_augment.py)
AUG_IMPLS = TRANSFORM_IMPLS + ("batched",)


class TwoCropsTransform:
    """Take two random crops of one image as the query and key."""

    def __init__(self, base_transform: transforms.Compose):
        self.base_transform = base_transform

    def __call__(self, x: Image.Image) -> list[torch.Tensor]:
        q = self.base_transform(x)
        k = self.base_transform(x)
        return [q, k]


class GaussianBlur:
    """Gaussian blur augmentation in SimCLR https://arxiv.org/abs/2002.05709"""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        # torch's generator, like every other random choice of the pipeline
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


def get_recipe(name: str) -> Recipe:
    """The recipe of a name, or a UsageError."""
    if name not in RECIPES:
        raise UsageError(f"unknown augmentation {name!r}; use one of {tuple(RECIPES)}")
    return RECIPES[name]


def _random_apply(transform, p):
    # RandomApply draws a number even at p = 1: the original leaves such a transform out
    return transform if p == 1 else transforms.RandomApply([transform], p=p)


def pretrain_augmentation(
    recipe: str = "v1", size: int = 224, normalize: str = "imagenet"
) -> transforms.Compose:
    """
    One crop's augmentation of a recipe ("v1", "v2" as --aug-plus, or "cifar10") as the
    original's torchvision transforms.
    """
    r = get_recipe(recipe)
    mean, std = normalization(normalize)
    operations = {
        "gray": lambda: transforms.RandomGrayscale(p=r.gray_p),
        "jitter": lambda: _random_apply(transforms.ColorJitter(*r.jitter), r.jitter_p),
        # a recipe with "blur" in its order has its sigma range (Recipe checks)
        "blur": lambda: _random_apply(
            GaussianBlur(r.blur_sigma), r.blur_p  # type: ignore[arg-type]
        ),
        "flip": lambda: transforms.RandomHorizontalFlip(p=r.flip_p),
    }
    augmentation = [transforms.RandomResizedCrop(size, scale=r.scale, ratio=r.ratio)]
    augmentation += [operations[op]() for op in r.order]
    return transforms.Compose(
        augmentation + [transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


def pretrain_transform(
    recipe: str = "v1",
    size: int = 224,
    impl: str = "original",
    normalize: str = "imagenet",
) -> Callable[[Image.Image], list[torch.Tensor]]:
    """
    Image -> [query crop, key crop] of a recipe. impl "original" runs the transforms
    above, "fast" the same recipe with the same random draws (moco/fast_augment.py).
    """
    if impl == "original":
        return TwoCropsTransform(pretrain_augmentation(recipe, size, normalize))
    if impl == "fast":
        # fast_augment reads the recipes defined here
        from moco.fast_augment import FastTwoCrops

        return FastTwoCrops(recipe, size, *normalization(normalize))
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


def normalization(name: str) -> tuple[list[float], list[float]]:
    """(mean, std) of a named normalisation."""
    if name not in NORMALIZATIONS:
        raise UsageError(
            f"unknown normalisation {name!r}; use one of {tuple(NORMALIZATIONS)}"
        )
    return NORMALIZATIONS[name]
