"""The published values, stated here from the papers and the original's code (main_moco.py,
moco/loader.py and the official CIFAR-10 demo, facebookresearch/moco), held against what
the programs build: a changed constant fails here, whatever moco/ defines."""

import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

import main_knn
import main_lincls
import main_moco
from moco.builder import MoCo
from moco.loader import pretrain_transform

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])


def original_v1(size=224):
    """The original's MoCo v1 augmentation (InstDisc's)."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(*IMAGENET),
        ]
    )


def demo_cifar10(size=32):
    """The official CIFAR-10 demo's training augmentation."""
    return T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(*CIFAR10),
        ]
    )


def picture(width, height, seed=0):
    """Smooth colours with some grain: every operation of a recipe changes it."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-10, 10, (height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def seeded(seed):
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.mark.parametrize(
    "recipe, size, normalize, reference, image",
    [
        ("v1", 224, "imagenet", original_v1, (64, 48)),
        ("cifar10", 32, "cifar10", demo_cifar10, (32, 32)),
    ],
)
def test_original_pipeline_makes_the_published_recipes_crops(
    recipe, size, normalize, reference, image
):
    img = picture(*image)
    ours = pretrain_transform(recipe, size, "original", normalize)
    published = reference(size)
    for seed in range(12):
        seeded(seed)
        q, k = ours(img)
        seeded(seed)
        assert torch.equal(q, published(img)) and torch.equal(k, published(img)), seed


def steps(transform):
    """The transforms a two-crop transform applies to each crop, in order, wherever it
    keeps them: RandomApply as itself followed by what it wraps."""
    if isinstance(transform, T.Compose):
        return [s for t in transform.transforms for s in steps(t)]
    if isinstance(transform, T.RandomApply):
        return [transform] + [s for t in transform.transforms for s in steps(t)]
    if isinstance(transform, torch.nn.Module) or isinstance(transform, T.ToTensor):
        return [transform]
    inner = [v for v in vars(transform).values() if isinstance(v, T.Compose)]
    return [s for t in inner for s in steps(t)] if inner else [transform]


def check_crop(t, size, scale):
    assert isinstance(t, T.RandomResizedCrop)
    assert tuple(t.size) == (size, size) and tuple(t.scale) == scale
    assert tuple(t.ratio) == pytest.approx((3 / 4, 4 / 3))
    assert t.interpolation == T.InterpolationMode.BILINEAR


def check_jitter(t, brightness, contrast, saturation, hue):
    assert isinstance(t, T.ColorJitter)
    assert tuple(t.brightness) == pytest.approx((1 - brightness, 1 + brightness))
    assert tuple(t.contrast) == pytest.approx((1 - contrast, 1 + contrast))
    assert tuple(t.saturation) == pytest.approx((1 - saturation, 1 + saturation))
    assert tuple(t.hue) == pytest.approx((-hue, hue))


def check_normalize(t, mean_std):
    assert isinstance(t, T.Normalize)
    assert list(t.mean) == mean_std[0] and list(t.std) == mean_std[1]


def test_v1_is_the_original_moco_v1_augmentation():
    crop, gray, jitter, flip, to_tensor, normalize = steps(pretrain_transform("v1"))
    check_crop(crop, 224, (0.2, 1.0))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    check_jitter(jitter, 0.4, 0.4, 0.4, 0.4)  # always applied
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(to_tensor, T.ToTensor)
    check_normalize(normalize, IMAGENET)


def test_v2_is_the_original_moco_v2_augmentation():
    crop, apply_jitter, jitter, gray, apply_blur, blur, flip, to_tensor, normalize = (
        steps(pretrain_transform("v2"))
    )
    check_crop(crop, 224, (0.2, 1.0))
    assert isinstance(apply_jitter, T.RandomApply) and apply_jitter.p == 0.8
    check_jitter(jitter, 0.4, 0.4, 0.4, 0.1)  # "not strengthened"
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert isinstance(apply_blur, T.RandomApply) and apply_blur.p == 0.5
    assert not isinstance(blur, torch.nn.Module)  # the original's own class
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(to_tensor, T.ToTensor)
    check_normalize(normalize, IMAGENET)


def test_v2_blurs_half_the_crops_with_a_sigma_drawn_from_0_1_to_2(monkeypatch):
    radii = []
    real = ImageFilter.GaussianBlur.filter

    def blur(self, image):
        radii.append(self.radius)
        return real(self, image)

    monkeypatch.setattr(ImageFilter.GaussianBlur, "filter", blur)
    transform = pretrain_transform("v2", 16)
    img = picture(24, 20)
    for seed in range(200):
        seeded(seed)
        transform(img)
    # 400 crops: about half blurred (the bounds: 3 standard deviations), sigma
    # uniform on [0.1, 2.0] (its mean 1.05, within 3 standard deviations of 200 draws)
    assert 0.42 < len(radii) / 400 < 0.58
    assert 0.1 <= min(radii) < 0.2 and 1.9 < max(radii) <= 2.0
    assert np.mean(radii) == pytest.approx(1.05, abs=0.12)


def test_cifar10_is_the_official_demos_augmentation():
    crop, flip, apply_jitter, jitter, gray, to_tensor, normalize = steps(
        pretrain_transform("cifar10", 32, "original", "cifar10")
    )
    check_crop(crop, 32, (0.08, 1.0))  # RandomResizedCrop's default scale
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(apply_jitter, T.RandomApply) and apply_jitter.p == 0.8
    check_jitter(jitter, 0.4, 0.4, 0.4, 0.1)
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert isinstance(to_tensor, T.ToTensor)
    check_normalize(normalize, CIFAR10)


def test_the_moco_class_defaults_are_the_originals():
    def encoder(num_classes):
        return torch.nn.Linear(4, num_classes)

    model = MoCo(encoder)
    assert (model.K, model.m, model.T) == (65536, 0.999, 0.07)
    assert model.queue.shape == (128, 65536) and model.encoder_q.out_features == 128
    assert isinstance(model.encoder_q, torch.nn.Linear)  # no MLP head


def test_main_moco_defaults_are_the_originals():
    args = main_moco.get_args_parser().parse_args(["DIR"])
    expected = {
        "arch": "resnet50",
        "workers": 32,
        "epochs": 200,
        "start_epoch": 0,
        "batch_size": 256,
        "lr": 0.03,
        "schedule": [120, 160],
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "print_freq": 10,
        "resume": "",
        "world_size": -1,
        "rank": -1,
        "dist_url": "tcp://224.66.41.62:23456",
        "dist_backend": "nccl",
        "seed": None,
        "gpu": None,
        "multiprocessing_distributed": False,
        "moco_dim": 128,
        "moco_k": 65536,
        "moco_m": 0.999,
        "moco_t": 0.07,
        "mlp": False,
        "aug_plus": False,
        "cos": False,
        "input_size": 224,
    }
    assert {k: getattr(args, k) for k in expected} == expected
    # MoCo v2: --mlp --moco-t 0.2 --aug-plus --cos
    v2 = main_moco.get_args_parser().parse_args(
        ["--mlp", "--moco-t", "0.2", "--aug-plus", "--cos", "DIR"]
    )
    assert (v2.mlp, v2.moco_t, v2.aug_plus, v2.cos) == (True, 0.2, True, True)


def test_main_lincls_defaults_are_the_originals():
    args = main_lincls.get_args_parser().parse_args(["DIR"])
    expected = {
        "arch": "resnet50",
        "workers": 32,
        "epochs": 100,
        "start_epoch": 0,
        "batch_size": 256,
        "schedule": [60, 80],
        "momentum": 0.9,
        "weight_decay": 0.0,
        "print_freq": 10,
        "pretrained": "",
        "evaluate": False,
        "input_size": 224,
    }
    assert {k: getattr(args, k) for k in expected} == expected
    # the rate, 30, is taken where it acts: tests/test_learning.py


def test_knn_defaults_are_the_demos_monitor():
    for module in (main_moco, main_knn):
        args = module.get_args_parser().parse_args(["DIR"])
        assert (args.knn_k, args.knn_t) == (200, 0.1)
