"""
The operations of the augmentation recipes (moco/loader.py), each defined once, named
after the torchvision transform (or the original's GaussianBlur) it stands for:

  transform(size)    that transform itself, as the original runs it
                     (--aug-impl original);
  draw()             its random parameters, from the same generator and in the same
                     order as that transform draws them, or None where it leaves the
                     crop as it is: a seed gives the same crops in every form;
  image(crop, d)     on one crop in a loader worker (--aug-impl fast);
  steps(rows, d)     on a batch of crops, on the training device (--aug-impl
                     batched), as batched calls planned on the host.

The original's operations run on PIL images and end in uint8, so these end in whole
grey levels too, rounded or truncated as PIL does: grayscale, brightness, contrast,
saturation and hue are PIL's arithmetic bit for bit (the fast form calls PIL itself
where it is the quickest; the arithmetic below serves both forms). Two differ from
PIL within bounds the tests state: the resize is torch's antialiased bilinear (PIL's
filter, other rounding), and the blur is PIL's box passes without its rounding to
uint8 after each pass.
"""

import contextlib
import functools
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms
from PIL import Image, ImageEnhance, ImageFilter, ImageStat

# a crop in the fast form: a PIL image, or [3, H, W] levels (uint8, channels last in
# memory, until the blur makes them floats)
Crop = Image.Image | torch.Tensor


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """
    Every draw under one seed: torch's CPU generator, and Python's random (the
    original's GaussianBlur draws from it), restored afterwards.
    """
    state = random.getstate()
    # the CPU generator only: torch.manual_seed would also seed every GPU's
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def as_pil(crop: Crop) -> Image.Image:
    if isinstance(crop, Image.Image):
        return crop
    # torch's strided copy is the fast one
    return Image.fromarray(crop.permute(1, 2, 0).contiguous().numpy())


def as_tensor(crop: Crop) -> torch.Tensor:
    """[3, H, W] levels; a PIL image's own pixels, channels last in memory."""
    if not isinstance(crop, Image.Image):
        return crop
    with warnings.catch_warnings():
        # the array is read-only; nothing here writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(crop)).permute(2, 0, 1)


class Step(NamedTuple):
    """
    One batched call: x[rows] = fn(x[rows]), or fn(x[rows], numbers) with one row of
    numbers per crop, which reach the device with every other step's in one copy.
    """

    rows: list[int]
    fn: Callable[..., torch.Tensor]
    numbers: list[list[float]] | None = None


class Operation:
    """An operation after the crop (see the module's docstring)."""

    def transform(self, size: int) -> Callable:
        raise NotImplementedError

    def draw(self) -> Any:
        raise NotImplementedError

    def image(self, crop: Crop, drawn: Any) -> Crop:
        raise NotImplementedError

    def steps(self, rows: list[int], drawn: list) -> list[Step]:
        raise NotImplementedError


# --- crop ---------------------------------------------------------------------------


class RandomResizedCrop:
    """
    torchvision's RandomResizedCrop: a box of the image (top, left, height, width)
    drawn by area and aspect ratio, resized to size x size, bilinear, antialiased.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.scale = scale
        self.ratio = ratio

    def transform(self, size: int) -> Callable:
        return transforms.RandomResizedCrop(size, scale=self.scale, ratio=self.ratio)

    def draw(self, img: Image.Image | torch.Tensor) -> tuple[int, int, int, int]:
        get = transforms.RandomResizedCrop.get_params
        return tuple(get(img, list(self.scale), list(self.ratio)))  # type: ignore

    def image(self, img: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
        """
        The box of img (uint8 [3, H, W], channels last in memory) in one pass of
        torch's uint8 resize (int16 weights; PIL's are int32).
        """
        top, left, height, width = box
        region = img[None, :, top : top + height, left : left + width]
        y = F.interpolate(
            region, (size, size), mode="bilinear", align_corners=False, antialias=True
        )
        return y[0]

    def batch(
        self, images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], size: int
    ) -> torch.Tensor:
        """
        [n, 3, size, size] float levels: each image's box in PIL's two passes, along
        the width then along the height, each rounded to a level.
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


# --- grayscale ----------------------------------------------------------------------


def luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L") of [n, 3, H, W] levels: ITU-R 601-2 in 16-bit fixed point."""
    r, g, b = x.unbind(1)
    # exact in float32: the sum stays below 2**24
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor_()[:, None]


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale with 3 output channels, as it runs on PIL."""
    return luma(x).repeat(1, 3, 1, 1)


class RandomGrayscale(Operation):
    """torchvision's RandomGrayscale(p)."""

    def __init__(self, p: float = 0.1):
        self.p = p

    def transform(self, size: int) -> Callable:
        return transforms.RandomGrayscale(p=self.p)

    def draw(self) -> bool | None:
        return True if torch.rand(1) < self.p else None

    def image(self, crop: Crop, drawn: bool) -> Crop:
        return as_pil(crop).convert("L").convert("RGB")

    def steps(self, rows: list[int], drawn: list) -> list[Step]:
        return [Step(rows, rgb_to_grayscale)]


# --- colour jitter ------------------------------------------------------------------


def blend(
    base: float | torch.Tensor, x: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """
    PIL's Image.blend(base, x, factor) as ImageEnhance uses it (Blend.c): float32,
    truncated to a level; one factor per crop of [n, 3, H, W].
    """
    factor = factor.to(torch.float32).view(-1, 1, 1, 1)
    return (base + factor * (x - base)).clamp_(0, 255).floor_()


def blend_table(base: int, factor: float) -> list[int]:
    """blend() of every level, as Image.point takes it for the three bands."""
    levels = torch.arange(256, dtype=torch.float32)
    table = blend(base, levels, torch.tensor(factor, dtype=torch.float64))
    return table.flatten().to(torch.uint8).tolist() * 3


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return blend(0.0, x, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the crop's mean grey, rounded half up."""
    grey = luma(x).flatten(1).to(torch.int64)
    total, n = grey.sum(1), grey.shape[1]
    mean = torch.div(2 * total + n, 2 * n, rounding_mode="floor")
    return blend(mean.to(x.dtype).view(-1, 1, 1, 1), x, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the crop's own grey."""
    return blend(luma(x), x, factor)


def _round_half_away(x):
    r = x.floor()
    return r + (x - r >= 0.5)


def _hsv_hue(r, g, b):
    """PIL's RGB -> HSV hue byte (Convert.c, rgb2hsv_row), with its float/double steps."""
    v = torch.maximum(torch.maximum(r, g), b)
    m = torch.minimum(torch.minimum(r, g), b)
    cr = (v - m).float().clamp(min=1)  # a grey pixel gets hue 0 either way
    rc, gc, bc = ((v - c).float() / cr for c in (r, g, b))
    h = torch.where(
        r == v,
        (bc - gc).double(),
        torch.where(
            g == v, 2.0 + rc.double() - bc.double(), 4.0 + gc.double() - rc.double()
        ),
    ).float()
    h = h.double() / 6.0 + 1.0
    h = torch.where(h >= 1.0, h - 1.0, h).float()  # fmod(h, 1.0)
    return (h.double() * 255.0).to(torch.int32)


@functools.cache
def hue_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """
    Hue and chroma depend only on (g - r, b - r), saturation on (chroma, value); after
    the shift, HSV -> RGB (Convert.c, hsv2rgb) gives value, p = f(s, v) and, by
    sector, q or t = round(v * w(h, s)). Tables of those, computed with PIL's
    arithmetic on the CPU, copied once to each other device.
    """
    if device.type != "cpu":
        return tuple(t.to(device) for t in hue_tables(torch.device("cpu")))
    d = torch.arange(-255, 256, dtype=torch.int32)
    dg, db = torch.meshgrid(d, d, indexing="ij")
    hi = dg.clamp(min=0).maximum(db)
    lo = dg.clamp(max=0).minimum(db)
    r = 255 - hi  # the colour with these differences and value 255, where one exists
    hue = _hsv_hue(r, r + dg, r + db).clamp(0, 255)
    chroma = (hi - lo).clamp(max=255)
    hue_chroma = (hue | chroma << 8).flatten()  # [(g - r + 255) * 511 + b - r + 255]

    i = torch.arange(256, dtype=torch.int32)
    cr, v = torch.meshgrid(i, i, indexing="ij")
    s = (
        (cr.float() / v.float().clamp(min=1))
        .double()
        .mul(255.0)
        .to(torch.int32)
        .clamp(max=255)
    )
    fs = (i.float().double() / 255.0).float()  # [s]
    p = _round_half_away(v.double() * (1.0 - fs.double()[s])).to(torch.int32)
    sat_p = (s | p << 8).flatten()  # [chroma * 256 + v]

    x = i.float().double() * 6.0 / 255.0
    sector = x.floor()
    f = (x - sector).float()[:, None]  # [h, 1]
    w_q = 1.0 - (fs[None, :] * f).double()
    w_t = 1.0 - fs.double()[None, :] * (1.0 - f.double())
    sector = sector.to(torch.int64) % 6
    w = torch.where(sector[:, None] % 2 == 1, w_q, w_t).flatten()  # [h * 256 + s]
    # bit offset in (r | g << 8 | b << 16) of v, p and (q or t), by sector
    order = torch.tensor(
        [[0, 2, 1], [1, 2, 0], [1, 0, 2], [2, 0, 1], [2, 1, 0], [0, 1, 2]]
    )
    offsets = (order * 8).to(torch.int32)[sector].t().contiguous()  # [3, h]
    return hue_chroma, sat_p, w, offsets


def _look_up(table, index):
    return table.index_select(0, index.flatten()).view(index.shape)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """
    torchvision's adjust_hue on PIL images (RGB -> HSV with byte-valued channels, the
    hue byte shifted by int(hue * 255) mod 256, -> RGB) through hue_tables, bit for
    bit, on [n, 3, H, W] levels with one factor per crop (float64).
    """
    hue_chroma, sat_p, w, (at_v, at_p, at_third) = hue_tables(x.device)
    n, _, height, width = x.shape
    shift = torch.remainder(torch.trunc(hue.double() * 255), 256).to(torch.int32)
    planes = x.to(torch.int32, memory_format=torch.contiguous_format)
    r, g, b = planes.view(n, 3, -1).unbind(1)  # [n, H * W] each
    v = torch.maximum(torch.maximum(r, g), b)
    key = torch.add(b, g, alpha=511).sub_(r, alpha=512).add_(255 * 512)  # g - r, b - r
    hc = _look_up(hue_chroma, key)  # hue | chroma << 8
    sp = _look_up(sat_p, (hc & 0xFF00).add_(v))  # saturation | p << 8
    h = hc.bitwise_and_(255).add_(shift.view(n, 1)).bitwise_and_(255)
    third = _look_up(w, (sp & 255).add_(h, alpha=256)).mul_(v)
    # round half away from zero; no v * w lies on .5 (all 2**24 checked)
    third = third.add_(0.5).to(torch.int32)
    rgb = v.bitwise_left_shift_(_look_up(at_v, h))
    rgb.bitwise_or_(sp.bitwise_right_shift_(8).bitwise_left_shift_(_look_up(at_p, h)))
    rgb.bitwise_or_(third.bitwise_left_shift_(_look_up(at_third, h)))
    # r | g << 8 | b << 16 read as bytes, little-endian as every platform torch runs on
    rgb = rgb.view(torch.uint8).view(n, height, width, 4)[..., :3]
    return rgb.permute(0, 3, 1, 2).to(x.dtype)


ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class ColorJitter(Operation):
    """
    torchvision's ColorJitter(brightness, contrast, saturation, hue): its draw is
    (the order of the four adjustments, brightness, contrast, saturation, hue).
    """

    def __init__(
        self,
        brightness: float = 0,
        contrast: float = 0,
        saturation: float = 0,
        hue: float = 0,
    ):
        self.strengths = brightness, contrast, saturation, hue
        # the factors' ranges, as torchvision makes them
        self.ranges = transforms.ColorJitter(*self.strengths)

    def transform(self, size: int) -> Callable:
        return transforms.ColorJitter(*self.strengths)

    def draw(self) -> tuple:
        t = self.ranges
        order, *factors = t.get_params(t.brightness, t.contrast, t.saturation, t.hue)
        return (tuple(order.tolist()), *factors)

    def image(self, crop: Crop, drawn: tuple) -> Crop:
        order, *factors = drawn
        for i in order:
            factor = factors[i]
            if factor is None:
                continue
            if i == 0:
                crop = as_pil(crop).point(blend_table(0, factor))
            elif i == 1:
                crop = as_pil(crop)
                # the mean grey as ImageEnhance.Contrast takes it
                mean = ImageStat.Stat(crop.convert("L")).mean[0]
                crop = crop.point(blend_table(int(mean + 0.5), factor))
            elif i == 2:
                crop = ImageEnhance.Color(as_pil(crop)).enhance(factor)
            else:
                hue = torch.tensor([factor], dtype=torch.float64)
                crop = adjust_hue(as_tensor(crop)[None], hue)[0]
        return crop

    def steps(self, rows: list[int], drawn: list) -> list[Step]:
        # at each of the four stages, the crops that make the same adjustment together
        steps = []
        for stage in range(4):
            for i, adjust in enumerate(ADJUSTMENTS):
                at = [
                    (n, d[1 + i])
                    for n, d in zip(rows, drawn)
                    if d[0][stage] == i and d[1 + i] is not None
                ]
                if at:
                    steps.append(Step([n for n, _ in at], adjust, [[f] for _, f in at]))
        return steps


# --- blur ---------------------------------------------------------------------------

# the box passes of PIL's GaussianBlur along each axis
BLUR_PASSES = 3


def box_blur_radius(sigma: float, passes: int = BLUR_PASSES) -> np.float32:
    """PIL's box radius for a Gaussian sigma (BoxBlur.c, _gaussian_blur_radius), float32."""
    f = np.float32
    s2 = f(f(sigma) * f(sigma) / f(passes))
    length = f(np.sqrt(12.0 * np.float64(s2) + 1.0))
    whole = f(np.floor((np.float64(length) - 1.0) / 2.0))
    a = f((f(2) * whole + f(1)) * (whole * (whole + f(1)) - f(3) * s2))
    a = f(a / (f(6) * (s2 - (whole + f(1)) * (whole + f(1)))))
    return f(whole + a)


def box_weights(radius: float | np.floating) -> tuple[int, float, float]:
    """PIL's extended box: 2r+1 taps of weight ww and two outer taps of weight fw (/2**24)."""
    r = int(radius)
    ww = int(np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (2 * r + 1) * ww) // 2
    return r, ww / 2**24, fw / 2**24


def blur_taps(sigmas: Sequence[float]) -> list[list[float]]:
    """
    Each sigma's extended box (PIL's GaussianBlur(radius=sigma), one pass's share of
    the variance), centred in as many taps as the widest of them needs.
    """
    boxes = [box_weights(box_blur_radius(s)) for s in sigmas]
    widest = max(r for r, _, _ in boxes)
    taps = []
    for r, ww, fw in boxes:
        zeros = [0.0] * (widest - r)
        taps.append(zeros + [fw] + [ww] * (2 * r + 1) + [fw] + zeros)
    return taps


def box_blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """
    PIL's GaussianBlur on [n, C, H, W] float levels with each crop's blur_taps: not a
    sampled Gaussian but three extended box passes along the width, then three along
    the height, the edges repeated, as BoxBlur.c; without its rounding to uint8 after
    each of the six passes.
    """
    weights = taps.to(x.dtype).view(len(taps), 1, 1, 1, -1).unbind(-1)
    half = len(weights) // 2
    for dim, pad in (-1, (half, half, 0, 0)), (-2, (0, 0, half, half)):
        n = x.shape[dim]
        for _ in range(BLUR_PASSES):
            padded = F.pad(x, pad, mode="replicate")
            x = weights[0] * padded.narrow(dim, 0, n)
            for k in range(1, len(weights)):
                x.addcmul_(padded.narrow(dim, k, n), weights[k])
    return x


class GaussianBlur(Operation):
    """
    The original's GaussianBlur (SimCLR's https://arxiv.org/abs/2002.05709): PIL's
    GaussianBlur(radius=sigma), sigma drawn uniformly by Python's random. It is its own
    transform.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=self.draw()))

    def transform(self, size: int) -> Callable:
        return self

    def draw(self) -> float:
        return random.uniform(self.sigma[0], self.sigma[1])

    def image(self, crop: Crop, drawn: float) -> Crop:
        taps = torch.tensor(blur_taps([drawn]), dtype=torch.float64)
        return box_blur(as_tensor(crop).float()[None], taps)[0]

    def steps(self, rows: list[int], drawn: list) -> list[Step]:
        return [Step(rows, box_blur, blur_taps(drawn))]


# --- flip ---------------------------------------------------------------------------


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


class RandomHorizontalFlip(Operation):
    """torchvision's RandomHorizontalFlip(p)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def transform(self, size: int) -> Callable:
        return transforms.RandomHorizontalFlip(p=self.p)

    def draw(self) -> bool | None:
        return True if torch.rand(1) < self.p else None

    def image(self, crop: Crop, drawn: bool) -> Crop:
        return hflip(as_tensor(crop))

    def steps(self, rows: list[int], drawn: list) -> list[Step]:
        return [Step(rows, hflip)]


# --- with a probability -------------------------------------------------------------


class RandomApply(Operation):
    """torchvision's RandomApply([operation], p)."""

    def __init__(self, operation: Operation, p: float = 0.5):
        self.operation = operation
        self.p = p

    def transform(self, size: int) -> Callable:
        return transforms.RandomApply([self.operation.transform(size)], p=self.p)

    def draw(self) -> Any:
        return None if self.p < torch.rand(1) else self.operation.draw()

    def image(self, crop: Crop, drawn: Any) -> Crop:
        return self.operation.image(crop, drawn)

    def steps(self, rows: list[int], drawn: list) -> list[Step]:
        return self.operation.steps(rows, drawn)


# --- a recipe -----------------------------------------------------------------------


class Recipe:
    """A crop, then operations, in the order the original lists its transforms."""

    def __init__(self, crop: RandomResizedCrop, *operations: Operation):
        self.crop = crop
        self.operations = operations
        # the fast form leaves uint8 (and PIL) at the blur: only a flip may follow it
        kinds = [type(getattr(op, "operation", op)) for op in operations]
        if GaussianBlur in kinds:
            after = kinds[kinds.index(GaussianBlur) + 1 :]
            assert set(after) <= {RandomHorizontalFlip}, kinds

    def transform(self, size: int) -> list[Callable]:
        """The original's transforms, up to ToTensor."""
        return [self.crop.transform(size)] + [
            op.transform(size) for op in self.operations
        ]

    def draw(self, img: Image.Image | torch.Tensor) -> list:
        """One crop's draws: its box, then each operation's (or None)."""
        return [self.crop.draw(img)] + [op.draw() for op in self.operations]

    def image(self, img: torch.Tensor, drawn: Sequence, size: int) -> torch.Tensor:
        """
        One crop of img (uint8 [3, H, W], channels last in memory) for its draws:
        [3, size, size] levels, uint8, or float after a blur.
        """
        crop: Crop = self.crop.image(img, drawn[0], size)
        for op, d in zip(self.operations, drawn[1:]):
            if d is not None:
                crop = op.image(crop, d)
        return as_tensor(crop)

    def batch(
        self, images: Sequence[torch.Tensor], drawn: Sequence[Sequence], size: int
    ) -> torch.Tensor:
        """
        The crops of images[i] (3 x H x W levels, all on one device) for drawn[i]:
        [n, 3, size, size] float levels there.
        """
        x = self.crop.batch(images, [d[0] for d in drawn], size)
        steps = []
        for i, op in enumerate(self.operations, start=1):
            rows = [n for n, d in enumerate(drawn) if d[i] is not None]
            if rows:
                steps += op.steps(rows, [drawn[n][i] for n in rows])
        return run_steps(x, steps)


def run_steps(x: torch.Tensor, steps: Sequence[Step]) -> torch.Tensor:
    """
    The steps on x in turn. Their rows and numbers reach x's device in one copy that
    the host does not wait for (from pinned memory on CUDA); nothing is read back.
    """
    values = []
    for step in steps:
        values += step.rows + [f for row in step.numbers or [] for f in row]
    host = torch.tensor(values, dtype=torch.float64)
    if x.device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(x.device, non_blocking=True)
    at = 0
    for rows, fn, numbers in steps:
        m, k = len(rows), len(numbers[0]) if numbers else 0
        index = packed[at : at + m].long()
        args = [packed[at + m : at + m + m * k].view(m, k)] if numbers else []
        at += m + m * k
        x = x.index_copy_(0, index, fn(x.index_select(0, index), *args))
    return x
