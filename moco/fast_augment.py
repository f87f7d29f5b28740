"""
The augmentation recipes of moco/loader.py through faster operations, with the same
random draws: one seed gives the same crop boxes, jitter order and factors, grayscale,
blur sigma and flip as the original's transforms. Where it is faster:
  - resize: torch's uint8 antialiased bilinear (SIMD, int16 weights) instead of PIL's
    (int32 weights): the same filter, outputs differ by 1 in a few percent of values;
  - hue: PIL's RGB -> HSV -> RGB round trip computed through small tables, bit-exact
    (checked against PIL on all 2**24 colours);
  - blur: PIL's own three box passes (the same box widths and fixed-point weights)
    in float on the normalised crop, without PIL's rounding to uint8 after each of the
    six passes: at most 3 grey levels apart (six roundings of at most 1/2), 0.3 to 0.6
    on average on photographs (up to 1 on pixel noise, where PIL's rounding undoes
    most of a small-sigma blur);
  - brightness and contrast: PIL's blend arithmetic as a lookup table, bit-exact;
  - to tensor, flip and normalisation: one float conversion for both crops;
and saturation and grayscale are PIL's own calls.
"""

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as transforms
from PIL import Image, ImageEnhance, ImageStat

from moco.loader import get_recipe

# the three box passes of PIL's GaussianBlur
BLUR_PASSES = 3


@dataclass
class CropParams:
    """One crop's random draws, as plain numbers."""

    # top, left, height, width in the decoded image
    box: tuple[int, int, int, int]
    # ((order of the four adjustments), brightness, contrast, saturation, hue), or None
    jitter: tuple | None
    gray: bool
    # Gaussian blur sigma, None for no blur
    sigma: float | None
    flip: bool


def _applied(p: float) -> bool:
    """RandomApply's test, drawn only where p < 1 (see moco.loader.Recipe)."""
    return p == 1 or not p < torch.rand(1)


class FastTwoCrops:
    """
    Image -> [query crop, key crop] of a recipe of moco/loader.py ("v1", "v2",
    "cifar10"), normalised with `mean` and `std`: the same random draws as the
    original's transforms, faster operations (see above).
    """

    def __init__(
        self, recipe: str, size: int, mean: Sequence[float], std: Sequence[float]
    ):
        self.recipe = get_recipe(recipe)
        self.size = size
        self.crop = transforms.RandomResizedCrop(
            size, scale=self.recipe.scale, ratio=self.recipe.ratio
        )
        self.color = transforms.ColorJitter(*self.recipe.jitter)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        # built once here, shared by forked loader workers
        hue_tables()

    def sample(self, img: Image.Image) -> CropParams:
        """One crop's parameters, drawn in the order of the recipe's transforms."""
        r, c = self.recipe, self.color
        box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        jitter, gray, sigma, flip = None, False, None, False
        for op in r.order:
            if op == "gray":
                gray = bool(torch.rand(1) < r.gray_p)
            elif op == "jitter" and _applied(r.jitter_p):
                order, *factors = c.get_params(
                    c.brightness, c.contrast, c.saturation, c.hue
                )
                jitter = (tuple(order.tolist()), *factors)
            elif op == "blur" and _applied(r.blur_p):
                low, high = r.blur_sigma  # type: ignore[misc]
                sigma = torch.empty(1).uniform_(low, high).item()
            elif op == "flip":
                flip = bool(torch.rand(1) < r.flip_p)
        return CropParams(box, jitter, gray, sigma, flip)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        params = [self.sample(img), self.sample(img)]
        return self.apply(img, params)

    def apply(self, img: Image.Image, params: list[CropParams]) -> list[torch.Tensor]:
        """The crops of `img` (PIL) for the given parameters: [3, size, size] floats."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        # 1 x 3 x H x W, channels last in memory
        x = _pil_to_tensor(img).permute(2, 0, 1)[None]
        out = torch.empty(len(params), 3, self.size, self.size)
        for k, p in enumerate(params):
            # colour operations act on each pixel or on the mean grey: a flip commutes
            crop = self._colour(self._resized_crop(x, p.box), p)
            if p.flip:
                crop = crop.flip(1)
            out[k].copy_(crop.permute(2, 0, 1))
        # the same float operations as ToTensor and Normalize, for both crops at once
        out.div_(255).sub_(self.mean).div_(self.std)
        crops = list(out)
        for k, p in enumerate(params):
            # the recipe blurs after its colour operations; the blur commutes with the
            # flip and, up to float rounding, with the normalisation
            if p.sigma is not None:
                crops[k] = box_blur(crops[k], p.sigma)
        return crops

    def _resized_crop(self, x, box):
        top, left, height, width = box
        region = x[:, :, top : top + height, left : left + width]
        size = (self.size, self.size)
        y = torch.nn.functional.interpolate(
            region, size=size, mode="bilinear", align_corners=False, antialias=True
        )
        # H x W x 3 uint8
        return y[0].permute(1, 2, 0)

    def _colour(self, crop, p):
        """Jitter and grayscale in the recipe's order; returns H x W x 3 uint8."""
        for op in self.recipe.order:
            if op == "gray" and p.gray:
                crop = _grayscale(crop)
            elif op == "jitter" and p.jitter is not None:
                order, brightness, contrast, saturation, hue = p.jitter
                for i in order:
                    if i == 0:
                        crop = _to_pil(crop).point(blend_lut(0, brightness))
                    elif i == 1:
                        crop = _to_pil(crop)
                        # the mean grey as ImageEnhance.Contrast takes it
                        mean = ImageStat.Stat(crop.convert("L")).mean[0]
                        crop = crop.point(blend_lut(int(mean + 0.5), contrast))
                    elif i == 2:
                        crop = ImageEnhance.Color(_to_pil(crop)).enhance(saturation)
                    else:
                        crop = adjust_hue(_to_tensor(crop), hue)
        return _to_tensor(crop)


def _pil_to_tensor(img):
    """H x W x 3 uint8 tensor sharing the array that numpy makes of `img`."""
    with warnings.catch_warnings():
        # the array is read-only; nothing here writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img))


def _to_tensor(crop):
    return _pil_to_tensor(crop) if isinstance(crop, Image.Image) else crop


def _to_pil(crop):
    if isinstance(crop, Image.Image):
        return crop
    # torch's strided copy is the fast one
    return Image.fromarray(crop.contiguous().numpy())


def blend_lut(base: int, factor: float) -> list[int]:
    """
    Image.blend(a constant image `base`, image, factor) as a lookup table (Blend.c's
    float arithmetic), which is what ImageEnhance.Brightness (base 0) and Contrast (base
    the rounded mean grey) do, in one pass.
    """
    x = np.arange(256, dtype=np.float32)
    out = np.float32(base) + np.float32(factor) * (x - np.float32(base))
    return np.clip(out, 0, 255).astype(np.uint8).tolist() * 3


def _grayscale(crop):
    # torchvision's rgb_to_grayscale for PIL with three output channels
    return _to_pil(crop).convert("L").convert("RGB")


# --- hue: PIL's HSV round trip through tables -------------------------------------------


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
def hue_tables() -> tuple[torch.Tensor, ...]:
    """
    Hue and chroma depend only on (g - r, b - r), saturation on (chroma, value); after the
    shift, HSV -> RGB (Convert.c, hsv2rgb) gives value, p = f(s, v) and, by sector, q or
    t = round(v * w(h, s)). Tables of those, computed with PIL's arithmetic.
    """
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


def adjust_hue(img: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """
    torchvision's adjust_hue for PIL images (RGB -> HSV, shift the hue byte, -> RGB),
    bit for bit, on an H x W x 3 uint8 tensor.
    """
    hue_chroma, sat_p, w, (at_v, at_p, at_third) = hue_tables()
    shift = int(np.int32(hue_factor * 255).astype(np.uint8))  # as torchvision
    n = img.numel() // 3
    r, g, b = img.permute(2, 0, 1).reshape(3, n).to(torch.int32)
    v = torch.maximum(torch.maximum(r, g), b)
    key = torch.add(b, g, alpha=511).sub_(r, alpha=512).add_(255 * 512)  # g - r, b - r
    hc = hue_chroma.index_select(0, key)  # hue | chroma << 8
    sp = sat_p.index_select(0, (hc & 0xFF00).add_(v))  # saturation | p << 8
    h = hc.bitwise_and_(255).add_(shift).bitwise_and_(255)
    third = w.index_select(0, (sp & 255).add_(h, alpha=256)).mul_(v)
    # round half away from zero; no v * w lies on .5 (all 2**24 checked)
    third = third.add_(0.5).to(torch.int32)
    rgb = v.bitwise_left_shift_(at_v.index_select(0, h))
    rgb.bitwise_or_(
        sp.bitwise_right_shift_(8).bitwise_left_shift_(at_p.index_select(0, h))
    )
    rgb.bitwise_or_(third.bitwise_left_shift_(at_third.index_select(0, h)))
    # r | g << 8 | b << 16 read as bytes, little-endian as every platform torch runs on
    return rgb.view(torch.uint8).view(n, 4)[:, :3].reshape(img.shape)


# --- blur: PIL's box passes without rounding in between ---------------------------------


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


def box_blur(x: torch.Tensor, sigma: float, passes: int = BLUR_PASSES) -> torch.Tensor:
    """
    PIL's GaussianBlur(radius=sigma) on a float [..., H, W] tensor: `passes` extended box
    blurs along the width, then along the height, edges extended, no rounding between.
    """
    r, ww, fw = box_weights(box_blur_radius(sigma, passes))
    for dim in (-1, -2):
        n = x.shape[dim]
        for _ in range(passes):
            xp = torch.cat(
                [x.narrow(dim, 0, 1)] * (r + 1)
                + [x]
                + [x.narrow(dim, n - 1, 1)] * (r + 1),
                dim,
            )
            acc = xp.narrow(dim, 1, n).clone()
            for k in range(2, 2 * r + 2):
                acc += xp.narrow(dim, k, n)
            acc.mul_(ww).add_(
                xp.narrow(dim, 0, n) + xp.narrow(dim, 2 * r + 2, n), alpha=fw
            )
            x = acc
    return x
