import contextlib
import fcntl
import os
import random
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


def make_image_folder(
    root, classes=3, per_class=8, size=40, seed=0, splits=("train", "val")
):
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


# each pytest-xdist worker draws its ports from its own block, below the range the
# kernel hands out for port 0 and outgoing connections (usually 32768-60999), so that
# no other test, worker or gloo connection can be given the same port meanwhile
PORT_BASE, PORT_BLOCK = 20000, 1000
PORT_BLOCKS = (32768 - PORT_BASE) // PORT_BLOCK  # 12 workers' blocks, then reused


def free_port():
    """A port on 127.0.0.1 that nothing listens on, from this worker's block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    first = PORT_BASE + PORT_BLOCK * (int(worker.removeprefix("gw")) % PORT_BLOCKS)
    for port in random.Random().sample(range(first, first + PORT_BLOCK), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + PORT_BLOCK - 1}")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.environ.get("MOCO_TEST_PYTHON", __import__("sys").executable)

# the smallest real pretraining run: resnet18 with the CIFAR stem on 32px crops
TINY = [
    "-a",
    "resnet18",
    "--small-stem",
    "--input-size",
    "16",
    "--moco-dim",
    "16",
    "--moco-k",
    "64",
    "-b",
    "8",
    "-j",
    "0",
    "-p",
    "1",
    "--seed",
    "0",
]


def moco_args(data, out, *extra, epochs=1):
    import main_moco

    argv = [str(data), *TINY, "--epochs", str(epochs), "--output-dir", str(out), *extra]
    return main_moco.get_args_parser().parse_args(argv)


def run_moco(data, out, *extra, epochs=1):
    """main_moco.py in this process."""
    import main_moco

    return main_moco.main(moco_args(data, out, *extra, epochs=epochs))


def script(name, *argv, timeout=300, env=None, **kwargs):
    """A script of the repository in a subprocess; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [
            PYTHON,
            *(["-m", "torch.distributed.run"] if name == "torchrun" else []),
            *([] if name == "torchrun" else [os.path.join(REPO, name)]),
            *map(str, argv),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        **kwargs,
    )


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    """Two checkpoints hold bit-identical weights, queue, pointer and optimizer state."""
    assert a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (
                i,
                k,
            )


@contextlib.contextmanager
def session_folder(tmp_path_factory, name):
    """
    A folder of this test session that its pytest-xdist workers share, held by one
    worker at a time (with plain pytest, a folder of the session's own).
    """
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        # above each worker's folder: the session's
        base = base.parent
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield base / name


RESUME_EPOCHS = 2  # 3 steps an epoch on the 24-image folder


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
    """
    The uninterrupted seeded run of TINY on 2 processes (--multiprocessing-distributed,
    one checkpoint a step) that the tests of stopped and resumed 2-process runs compare
    with: its data folder, output folder and output. Made once per test session.
    """
    with session_folder(tmp_path_factory, "two_process_run") as root:
        if not (root / "output.txt").exists():
            shutil.rmtree(root, ignore_errors=True)
            data = make_image_folder(root / "data")
            run = script(
                "main_moco.py",
                data,
                *TINY,
                "--epochs",
                RESUME_EPOCHS,
                "--output-dir",
                root / "out",
                "--save-freq",
                "1",
                *spawn_flags(2),
            )
            assert run.returncode == 0, run.stdout + run.stderr
            (root / "output.txt").write_text(run.stdout + run.stderr)
    return str(root / "data"), root / "out", (root / "output.txt").read_text()


def spawn_flags(procs):
    """The flags that spawn `procs` CPU processes on this machine, the original's way."""
    return [
        "--multiprocessing-distributed",
        "--procs-per-node",
        str(procs),
        "--world-size",
        "1",
        "--rank",
        "0",
        "--dist-url",
        f"tcp://127.0.0.1:{free_port()}",
        "--dist-timeout",
        "60",
    ]
