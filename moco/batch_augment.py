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
passes without PIL's rounding after each pass. Given PIL's resize, the crops of a
recipe without blur are the original's bit for bit, with blur within 3 levels
(tests/test_batch_augment.py).

    dataset = SeededImageFolder(root, ReadAndSample(recipe, size), seed, decode=False)
    loader = DataLoader(dataset, batch_size, sampler=..., collate_fn=collate, ...)
    augment = BatchAugment(recipe, size, mean, std)
    for batch, _ in loader:
        im_q, im_k = augment(batch, device)
"""

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from moco.data import BadImageError, load_image
from moco.fast_augment import CropParams, FastTwoCrops, box_blur_radius, box_weights
from moco.loader import get_recipe
from moco.utils import logger

# the start of every JPEG file: SOI and the first marker's 0xFF
JPEG_MAGIC = b"\xff\xd8\xff"
# the JPEGs (PIL's mode from the header) that the batched decoders turn into PIL's RGB;
# the others (CMYK, YCCK) come out in other colours from nvjpeg
DECODER_MODES = ("RGB", "L")


# --- worker side: bytes and random draws -------------------------------------------


@dataclass
class EncodedImage:
    """One sample as ReadAndSample hands it to collate."""

    path: str
    # the file's bytes (1-D uint8) for a JPEG, else the decoded pixels (3 x H x W uint8)
    data: torch.Tensor
    # the query crop's and the key crop's CropParams
    params: list[CropParams]

    @property
    def is_jpeg(self) -> bool:
        return self.data.dim() == 1


class ReadAndSample:
    """
    Worker side: image path -> EncodedImage, under the sample's seeded random state.
    The two crops are drawn by FastTwoCrops.sample from the size in the file's header,
    so a JPEG is not decoded here. Other files, and JPEGs of other modes than
    DECODER_MODES, are decoded here on the CPU, with PIL as the original does.
    """

    def __init__(self, recipe: str, size: int):
        # only its sample() is used: the normalisation is BatchAugment's
        self.crops = FastTwoCrops(recipe, size, [0.0] * 3, [1.0] * 3)
        # shared by the loader workers, so that each message is given once
        self._told = torch.zeros(2, dtype=torch.bool).share_memory_()

    def __call__(self, path: str) -> EncodedImage:
        with open(path, "rb") as f:
            data = f.read()
        jpeg = data.startswith(JPEG_MAGIC)
        if jpeg:
            try:
                img = Image.open(io.BytesIO(data))  # reads the header only
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise BadImageError(f"cannot read image {path!r} ({e})") from None
            if img.mode not in DECODER_MODES:
                jpeg = False
                self._tell_once(
                    1,
                    f"=> {path} is a {img.mode} JPEG: JPEGs that are not RGB or "
                    "grayscale are decoded on the CPU in the loader workers",
                )
        else:
            self._tell_once(
                0,
                f"=> {path} is not a JPEG: files that are not JPEGs are decoded "
                "on the CPU in the loader workers",
            )
        if jpeg:
            pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            img = load_image(path)
            pixels = pil_to_tensor(img)
        params = [self.crops.sample(img), self.crops.sample(img)]
        return EncodedImage(path, pixels, params)

    def _tell_once(self, which, message):
        if not self._told[which]:
            self._told[which] = True
            logger.warning(message)


@dataclass
class EncodedBatch:
    """
    A batch as collate packs it in the loader worker: the same few tensors whatever
    its size. Each tensor that leaves a worker holds an open file until it is freed
    (torch's file_descriptor sharing), so a tensor per image runs out of them.
    """

    paths: list[str]
    # every image's EncodedImage.data, flattened, one after another (uint8)
    data: torch.Tensor
    # int64 [n + 1]: image i is data[offsets[i] : offsets[i + 1]]
    offsets: torch.Tensor
    # int64 [n, 2]: the height and width of pixels decoded in the worker, 0 for a JPEG
    sizes: torch.Tensor
    # all query crops' CropParams, then all key crops' (numbers: no tensors)
    params: list[CropParams]

    def __len__(self) -> int:
        return len(self.paths)

    def images(self) -> list[torch.Tensor]:
        """Each image's EncodedImage.data, a view into `data`."""
        ends = self.offsets.tolist()
        images = []
        for i, (height, width) in enumerate(self.sizes.tolist()):
            x = self.data[ends[i] : ends[i + 1]]
            images.append(x.view(3, height, width) if height else x)
        return images


def collate(
    samples: Sequence[tuple[EncodedImage, int]],
) -> tuple[EncodedBatch, torch.Tensor]:
    """DataLoader collate_fn: [(EncodedImage, target)] -> (EncodedBatch, targets)."""
    images, targets = zip(*samples)
    data = [im.data.flatten() for im in images]
    offsets = torch.tensor([0] + [len(x) for x in data]).cumsum(0)
    sizes = torch.tensor([(0, 0) if im.is_jpeg else im.data.shape[1:] for im in images])
    batch = EncodedBatch(
        paths=[im.path for im in images],
        data=torch.cat(data),
        offsets=offsets,
        sizes=sizes,
        params=[im.params[j] for j in range(2) for im in images],
    )
    return batch, torch.tensor(targets)


# --- device side: decode and the recipe on batches ----------------------------------


class BatchAugment:
    """
    Device side: an EncodedBatch -> (im_q, im_k), each a float tensor
    [B, 3, size, size] on `device`, normalised with `mean` and `std`.
    """

    def __init__(
        self, recipe: str, size: int, mean: Sequence[float], std: Sequence[float]
    ):
        self.recipe = get_recipe(recipe)
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self._warned: set[str] = set()

    def __call__(
        self, batch: EncodedBatch, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        pixels = self.decode(batch, device)
        params = batch.params
        x = resized_crops(pixels + pixels, [p.box for p in params], self.size)
        for op in self.recipe.order:
            if op == "gray":
                gray = [n for n, p in enumerate(params) if p.gray]
                x = _apply(x, gray, rgb_to_grayscale)
            elif op == "jitter":
                x = color_jitter(x, params)
            elif op == "blur":
                blurred = [n for n, p in enumerate(params) if p.sigma is not None]
                x = _apply(x, blurred, box_blur, [params[n].sigma for n in blurred])
            elif op == "flip":
                flipped = [n for n, p in enumerate(params) if p.flip]
                x = _apply(x, flipped, torch.flip, [-1])
        # ToTensor's and Normalize's float operations
        x = x.div_(255).sub_(self.mean.to(device)).div_(self.std.to(device))
        return x[: len(batch)], x[len(batch) :]

    def decode(
        self, batch: EncodedBatch, device: torch.device | str
    ) -> list[torch.Tensor]:
        """Each image as 3 x H x W uint8 on `device`; the JPEGs decoded together."""
        device = torch.device(device)
        images = batch.images()
        jpegs = [n for n, x in enumerate(images) if x.dim() == 1]
        paths = [batch.paths[n] for n in jpegs]
        decoded = self._decode_jpegs(paths, [images[n] for n in jpegs], device)
        decoded = dict(zip(jpegs, decoded))
        return [
            decoded[n] if n in decoded else x.to(device) for n, x in enumerate(images)
        ]

    def _decode_jpegs(self, paths, data, device):
        if not data:
            return []
        try:
            return decode_jpegs(data, device)
        except RuntimeError:
            # one file the decoder refuses fails the batch: find it
            return [self._decode_one(p, x, device) for p, x in zip(paths, data)]

    def _decode_one(self, path, data, device):
        try:
            return decode_jpegs([data], device)[0]
        except RuntimeError as e:
            if path not in self._warned:
                self._warned.add(path)
                reason = " ".join(str(e).split())
                logger.warning(
                    f"=> {path}: the batched JPEG decoder refused it ({reason}); "
                    "decoding it on the CPU with PIL"
                )
            # PIL, as the other paths: BadImageError if PIL cannot read it either
            return pil_to_tensor(load_image(path)).to(device)


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """
    JPEG bytes (1-D uint8 on the CPU) -> 3 x H x W RGB uint8 on `device`, written by
    the time they are returned (torchvision waits for its decoder's stream).
    """
    if device.type == "cuda":
        # nvjpeg writes unordered into freed blocks queued kernels may still read: drain
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _apply(x, rows, fn, *args):
    """x[rows] = fn(x[rows], *args): one batched call for the crops listed in rows."""
    if rows:
        index = torch.tensor(rows, device=x.device)
        x[index] = fn(x[index], *args)
    return x


def resized_crops(
    images: Sequence[torch.Tensor], boxes: Sequence[tuple[int, ...]], size: int
) -> torch.Tensor:
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


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale with 3 output channels, as it runs on PIL."""
    return _luma(x).repeat(1, 3, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(0.0, x, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the crop's mean grey, rounded half up."""
    grey = _luma(x).flatten(1).to(torch.int64)
    total, n = grey.sum(1), grey.shape[1]
    mean = torch.div(2 * total + n, 2 * n, rounding_mode="floor")
    return _blend(mean.to(x.dtype).view(-1, 1, 1, 1), x, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the crop's own grey."""
    return _blend(_luma(x), x, factor)


# PIL's HSV -> RGB puts v, p, q, t in these channels, by hue sector
_SECTORS = torch.tensor(
    [[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]]
)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
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


def color_jitter(x: torch.Tensor, params: Sequence[CropParams]) -> torch.Tensor:
    """
    Each crop's ColorJitter (CropParams.jitter, or none): its four adjustments in its
    own random order. At each of the four stages, the crops that make the same
    adjustment make it together.
    """
    orders = [p.jitter[0] if p.jitter is not None else None for p in params]
    for stage in range(4):
        for i, adjust in enumerate(ADJUSTMENTS):
            rows = [n for n, o in enumerate(orders) if o is not None and o[stage] == i]
            factors = [params[n].jitter[1 + i] for n in rows]  # type: ignore[index]
            factors = torch.tensor(factors, dtype=torch.float64, device=x.device)
            x = _apply(x, rows, adjust, factors)
    return x


# --- blur ---------------------------------------------------------------------------


def _extended_box(sigma, taps):
    """
    PIL's extended box of GaussianBlur(radius=sigma), centred in `taps` taps: 2r + 1
    taps of one weight and a smaller one each side, one pass's share of the variance.
    """
    r, ww, fw = box_weights(box_blur_radius(sigma))
    kernel = torch.zeros(taps, dtype=torch.float64)
    centre = taps // 2
    kernel[centre - r - 1 : centre + r + 2] = ww
    kernel[centre - r - 1] = kernel[centre + r + 1] = fw
    return kernel


def box_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
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
    radius = max(box_weights(box_blur_radius(s))[0] for s in sigmas) + 1
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
