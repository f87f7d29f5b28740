"""
The augmentation recipes (moco/loader.py) on batches, on the training device
(`--aug-impl batched`): loader workers only read each file's bytes and draw the crops'
random parameters (Recipe.draw, so a seed gives the same crops as on the other paths);
the JPEGs of a batch are decoded together on the device (nvjpeg on CUDA, libjpeg-turbo
on the CPU) and each operation's batched form (moco/augment.py) runs on [crops, 3, H,
W] tensors there. The host waits for the device once a batch, before the decoder
writes (decode_jpegs).

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
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from moco.data import BadImageError, load_image
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
    # the query crop's and the key crop's draws (Recipe.draw)
    params: list[list]

    @property
    def is_jpeg(self) -> bool:
        return self.data.dim() == 1


class ReadAndSample:
    """
    Worker side: image path -> EncodedImage, under the sample's seeded random state.
    The two crops are drawn from the size in the file's header, so a JPEG is not
    decoded here. Other files, and JPEGs of other modes than DECODER_MODES, are
    decoded here on the CPU, with PIL as the original does.
    """

    def __init__(self, recipe: str, size: int):
        self.recipe = get_recipe(recipe)
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
        params = [self.recipe.draw(img), self.recipe.draw(img)]
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
    # all query crops' draws, then all key crops' (numbers: no tensors)
    params: list[list]

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self) -> "EncodedBatch":
        """The DataLoader's pin_memory=True: the pixels copy to the GPU unwaited."""
        self.data = self.data.pin_memory()
        return self

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
        # mean and std on each device, copied there once
        self._normalization: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._warned: set[str] = set()

    def __call__(
        self, batch: EncodedBatch, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        pixels = self.decode(batch, device)
        x = self.recipe.batch(pixels + pixels, batch.params, self.size)
        if device not in self._normalization:
            self._normalization[device] = self.mean.to(device), self.std.to(device)
        mean, std = self._normalization[device]
        # ToTensor's and Normalize's float operations
        x = x.div_(255).sub_(mean).div_(std)
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
            decoded[n] if n in decoded else x.to(device, non_blocking=True)
            for n, x in enumerate(images)
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
        # nvjpeg writes unordered into freed blocks queued kernels may still read:
        # drain (the one wait of a batch)
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
