"""
The augmentation recipes of moco/loader.py on batches, on the training device
(`--aug-impl batched`): loader workers only read each file's bytes and draw the crops'
random parameters (FastTwoCrops.sample's draws, so a seed gives the same crops as on the
other paths); the JPEGs of a batch are decoded together on the device (nvjpeg on CUDA,
libjpeg-turbo on the CPU) and the recipe runs on [crops, 3, H, W] tensors there.

Each operation the original runs on a PIL image ends in uint8, so here each one ends in
whole grey levels (floats 0..255), rounded or truncated as PIL does. Grayscale,
brightness, contrast, saturation and hue are PIL's arithmetic, bit for bit (the hue
through PIL's byte-valued HSV); the resize is torch's antialiased bilinear, in PIL's two
passes, one level from PIL's fixed point in about 3% of values; the blur is PIL's box
passes without PIL's rounding after each pass. Given PIL's resize, v1 and cifar10 crops
are the original's bit for bit and v2's within 3 levels (tests/test_batch_augment.py).

    dataset = SeededImageFolder(root, ReadAndSample(recipe, size), seed, decode=False)
    loader = DataLoader(dataset, batch_size, sampler=..., collate_fn=collate, ...)
    augment = BatchAugment(recipe, size, mean, std)
    for images, _ in loader:
        im_q, im_k = augment(images, device)
"""

import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from moco.data import BadImageError, load_image
from moco.fast_augment import FastTwoCrops, _box_blur_radius, _box_weights
from moco.loader import check_recipe
from moco.utils import logger

# the start of every JPEG file: SOI and the first marker's 0xFF
JPEG_MAGIC = b"\xff\xd8\xff"


# --- worker side: bytes and random draws -------------------------------------------


@dataclass
class EncodedImage:
    """One sample as a loader worker hands it over."""

    path: str
    # the file's bytes (1-D uint8) for a JPEG, else the decoded pixels (3 x H x W uint8)
    data: torch.Tensor
    # the query crop's and the key crop's CropParams
    params: list

    @property
    def is_jpeg(self):
        return self.data.dim() == 1


class ReadAndSample:
    """
    Worker side: image path -> EncodedImage, under the sample's seeded random state.
    The two crops are drawn by FastTwoCrops.sample from the size in the file's header,
    so a JPEG is not decoded here. Other files are decoded here, on the CPU.
    """

    def __init__(self, recipe, size):
        check_recipe(recipe)
        # only its sample() is used: the normalisation is BatchAugment's
        self.crops = FastTwoCrops(recipe, size, [0.0] * 3, [1.0] * 3)
        # shared by the loader workers, so that the message is given once
        self._told = torch.zeros(1, dtype=torch.bool).share_memory_()

    def __call__(self, path):
        with open(path, "rb") as f:
            data = f.read()
        if data.startswith(JPEG_MAGIC):
            try:
                img = Image.open(io.BytesIO(data))  # reads the header only
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise BadImageError(f"cannot read image {path!r} ({e})") from None
            pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            if not self._told:
                self._told.fill_(True)
                logger.warning(
                    f"=> {path} is not a JPEG: files that are not JPEGs are decoded "
                    "on the CPU in the loader workers"
                )
            img = load_image(path)
            pixels = pil_to_tensor(img)
        params = [self.crops.sample(img), self.crops.sample(img)]
        return EncodedImage(path, pixels, params)


def collate(samples):
    """DataLoader collate_fn: [(EncodedImage, target)] -> ([EncodedImage], targets)."""
    images, targets = zip(*samples)
    return list(images), torch.tensor(targets)


# --- device side: decode and the recipe on batches ----------------------------------


class BatchAugment:
    """
    Device side: a collated batch of EncodedImages -> (im_q, im_k), each a float tensor
    [B, 3, size, size] on `device`, normalised with `mean` and `std`.
    """

    def __init__(self, recipe, size, mean, std):
        check_recipe(recipe)
        self.recipe = recipe
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self._warned = set()

    def __call__(self, images, device):
        device = torch.device(device)
        pixels = self.decode(images, device)
        # all query crops, then all key crops
        params = [im.params[j] for j in range(2) for im in images]
        x = resized_crops(pixels + pixels, [p.box for p in params], self.size)
        gray = [n for n, p in enumerate(params) if p.gray]
        if self.recipe == "v1":
            x = _apply(x, gray, rgb_to_grayscale)
        x = color_jitter(x, params)
        if self.recipe != "v1":
            x = _apply(x, gray, rgb_to_grayscale)
        blurred = [n for n, p in enumerate(params) if p.sigma is not None]
        sigmas = [params[n].sigma for n in blurred]
        x = _apply(x, blurred, box_blur, sigmas)
        x = _apply(x, [n for n, p in enumerate(params) if p.flip], torch.flip, [-1])
        # ToTensor's and Normalize's float operations
        x = x.div_(255).sub_(self.mean.to(device)).div_(self.std.to(device))
        return x[: len(images)], x[len(images) :]

    def decode(self, images, device):
        """Each image as 3 x H x W uint8 on `device`; the JPEGs decoded together."""
        jpegs = [im for im in images if im.is_jpeg]
        decoded = iter(self._decode_jpegs(jpegs, device) if jpegs else [])
        return [next(decoded) if im.is_jpeg else im.data.to(device) for im in images]

    def _decode_jpegs(self, jpegs, device):
        try:
            data = [im.data for im in jpegs]
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            # one file the decoder refuses fails the batch: find it
            return [self._decode_one(im, device) for im in jpegs]

    def _decode_one(self, im, device):
        try:
            return decode_jpeg(im.data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            if im.path not in self._warned:
                self._warned.add(im.path)
                reason = " ".join(str(e).split())
                logger.warning(
                    f"=> {im.path}: the batched JPEG decoder refused it ({reason}); "
                    "decoding it on the CPU with PIL"
                )
            # PIL, as the other paths: BadImageError if PIL cannot read it either
            return pil_to_tensor(load_image(im.path)).to(device)


def _apply(x, rows, fn, *args):
    """x[rows] = fn(x[rows], *args): one batched call for the crops listed in rows."""
    if rows:
        index = torch.tensor(rows, device=x.device)
        x[index] = fn(x[index], *args)
    return x


def resized_crops(images, boxes, size):
    """
    [n, 3, size, size] whole levels: each (top, left, height, width) box of its image
    resized as RandomResizedCrop does on PIL: bilinear, antialiased, along the width
    then along the height, rounded to uint8 after each pass.
    """
    crops = []
    for img, (top, left, height, width) in zip(images, boxes):
        x = img[None, :, top : top + height, left : left + width].float()
        for shape in (height, size), (size, size):
            x = F.interpolate(
                x, shape, mode="bilinear", align_corners=False, antialias=True
            )
            x = x.add_(0.5).floor_().clamp_(0, 255)  # PIL rounds halves up
        crops.append(x)
    return torch.cat(crops)


# --- colour: PIL's arithmetic on whole levels ---------------------------------------


def _luma(x):
    """PIL's convert("L") of [n, 3, H, W] levels: ITU-R 601-2 in 16-bit fixed point."""
    r, g, b = x.unbind(1)
    # exact in float32: the sum stays below 2**24
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor_()[:, None]


def _blend(base, x, factor):
    """PIL's Image.blend(base, x, factor) as ImageEnhance uses it: float32, truncated."""
    factor = factor.to(torch.float32).view(-1, 1, 1, 1)
    return (base + factor * (x - base)).clamp_(0, 255).floor_()


def rgb_to_grayscale(x):
    """torchvision's rgb_to_grayscale with 3 output channels, as it runs on PIL."""
    return _luma(x).repeat(1, 3, 1, 1)


def adjust_brightness(x, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _blend(0.0, x, factor)


def adjust_contrast(x, factor):
    """ImageEnhance.Contrast: blend with the crop's mean grey, rounded half up."""
    grey = _luma(x).flatten(1).to(torch.int64)
    total, n = grey.sum(1), grey.shape[1]
    mean = torch.div(2 * total + n, 2 * n, rounding_mode="floor")
    return _blend(mean.to(x.dtype).view(-1, 1, 1, 1), x, factor)


def adjust_saturation(x, factor):
    """ImageEnhance.Color: blend with the crop's own grey."""
    return _blend(_luma(x), x, factor)


# PIL's HSV -> RGB puts v, p, q, t in these channels, by hue sector
_SECTORS = torch.tensor(
    [[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]]
)


def adjust_hue(x, hue):
    """
    torchvision's adjust_hue on PIL images: PIL's RGB -> HSV with byte-valued channels,
    the hue byte shifted by int(hue * 255) mod 256, HSV -> RGB; PIL's float and double
    steps (Convert.c) in the same precision, so that it is bit-exact.
    """
    shift = torch.remainder(torch.trunc(hue.double() * 255), 256).view(-1, 1, 1, 1)
    v, m = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    chroma = (v - m).clamp(min=1)  # a grey pixel gets hue and saturation 0 either way
    rc, gc, bc = ((v - x) / chroma).double().split(1, dim=1)
    r, g = x[:, :1], x[:, 1:2]
    h = torch.where(r == v, bc - gc, torch.where(g == v, 2 + rc - bc, 4 + gc - rc))
    # rgb2hsv: h and s are floats, their bytes truncated from doubles
    h = torch.remainder(h.float().double() / 6 + 1, 1).float()
    h = (h.double() * 255).floor_()
    s = ((v - m) / v.clamp(min=1)).double().mul_(255).floor_()
    h = torch.remainder(h + shift, 256)
    # hsv2rgb
    sector = (h * 6 / 255).floor_()
    f = (h * 6 / 255 - sector).float()
    fs = (s / 255).float()
    v64 = v.double()
    p = v64 * (1 - fs.double())
    q = v64 * (1 - (fs * f).double())
    t = v64 * (1 - fs.double() * (1 - f.double()))
    vpqt = torch.cat([v64, p, q, t], 1).add_(0.5).floor_()  # C's round(): halves up
    channels = _SECTORS.to(x.device)[sector.long().remainder_(6).squeeze(1)]
    return vpqt.gather(1, channels.permute(0, 3, 1, 2)).to(x.dtype)


ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x, params):
    """
    Each crop's ColorJitter (CropParams.jitter, or none): its four adjustments in its
    own random order. At each of the four stages, the crops that make the same
    adjustment make it together.
    """
    orders = [p.jitter[0].tolist() if p.jitter is not None else None for p in params]
    for stage in range(4):
        for i, adjust in enumerate(ADJUSTMENTS):
            rows = [n for n, o in enumerate(orders) if o is not None and o[stage] == i]
            factors = [params[n].jitter[1 + i] for n in rows]
            factors = torch.tensor(factors, dtype=torch.float64, device=x.device)
            x = _apply(x, rows, adjust, factors)
    return x


# --- blur ---------------------------------------------------------------------------


def _extended_box(sigma, taps):
    """
    PIL's extended box of GaussianBlur(radius=sigma), centred in `taps` taps: 2r + 1
    taps of one weight and a smaller one each side, one pass's share of the variance.
    """
    r, ww, fw = _box_weights(_box_blur_radius(sigma))
    kernel = torch.zeros(taps, dtype=torch.float64)
    centre = taps // 2
    kernel[centre - r - 1 : centre + r + 2] = ww
    kernel[centre - r - 1] = kernel[centre + r + 1] = fw
    return kernel


def box_blur(x, sigmas):
    """
    PIL's GaussianBlur(radius=sigma) with each crop's sigma, on [n, 3, H, W].

    PIL does not convolve with a Gaussian: along each axis it runs three "extended" box
    blurs (BoxBlur.c), boxes whose widths and fractional end weights give the three
    passes together a variance of exactly sigma**2: a bell of support 3 * (r + 1) each
    side (6 pixels at sigma 2, 3 sigma), close to the Gaussian but not equal to it.
    These are the same passes, each padding by repeating the edge as PIL does, each one
    grouped convolution over all crops and channels, without PIL's rounding to uint8
    after each of the six passes: within 3 levels of PIL (as fast_augment.box_blur).
    A sampled Gaussian kernel of the same sigma, measured on photo-like crops, is as
    close on average but up to 8 levels off at edges.
    """
    n, c, height, width = x.shape
    radius = max(_box_weights(_box_blur_radius(s))[0] for s in sigmas) + 1
    kernels = torch.stack([_extended_box(s, 2 * radius + 1) for s in sigmas])
    # float64: cuDNN may run float32 convolutions as TF32, a 10-bit mantissa
    kernels = kernels.repeat_interleave(c, 0).to(x.device)[:, None, None, :]
    along_width = kernels, (radius, radius, 0, 0)
    along_height = kernels.mT, (0, 0, radius, radius)
    y = x.double().reshape(1, n * c, height, width)
    for weight, pad in along_width, along_height:  # PIL's order
        for _ in range(3):
            y = F.conv2d(F.pad(y, pad, mode="replicate"), weight, groups=n * c)
    return y.view(n, c, height, width).to(x.dtype)
