import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


def make_image_folder(root, classes=3, per_class=8, size=40, seed=0, splits=("train", "val")):
    """A tiny ImageFolder of random JPEGs: root/<split>/<class>/<image>."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                base = rng.integers(0, 255, size=3) * (c + 1) % 255
                noise = rng.integers(0, 60, size=(size, size, 3))
                img = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{i}.jpg"), quality=90)
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
