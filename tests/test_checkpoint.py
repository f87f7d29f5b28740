"""Checkpoint files: what a resume restores, wherever the model lives; what is refused."""

import os
import pickle
import random
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

import main_knn
import main_lincls
import main_moco
from detection import convert
from moco.checkpoint import Checkpointer, load_checkpoint
from moco.cli import run_cli


def _tiny_run(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Checkpointer(str(tmp_path), model, optimizer, scaler, arch="tiny")


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_resume_restores_the_random_states_into_a_model_on_another_device(tmp_path):
    # the file's tensors must not follow the model: on a GPU, NumPy's state mapped to
    # the device could not be read back. The meta device stands in for the GPU here,
    # as map_location="meta" moves the nested random states too.
    saver = _tiny_run(tmp_path)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    saver.save_epoch(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    mapped = torch.load(
        tmp_path / "checkpoint_0000.pth.tar", map_location="meta", weights_only=True
    )
    assert mapped["rng"]["numpy"][1].device.type == "meta"

    resumer = _tiny_run(tmp_path)
    resumer.model.to("meta")
    resumer.optimizer = torch.optim.SGD(resumer.model.parameters(), lr=0.1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    assert resumer.resume(str(tmp_path / "checkpoint_0000.pth.tar")) == (1, 0)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
    state = load_checkpoint(str(tmp_path / "checkpoint_0000.pth.tar"))
    assert all(v.device.type == "cpu" for v in state["state_dict"].values())


class _Marker:
    """A class a pickle can name: unpickling it would import and call code."""

    def __reduce__(self):
        return (os.mkdir, ("/nonexistent/unpickled",))


def not_checkpoints(tmp_path):
    """
    Files that are not checkpoints, each with what the one-line error must say it is
    (or, for the last, what it holds).
    """
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:\n")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(d / "image.jpg")
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert noise[:1] not in (b"\x80", b"P", b"\xff", b"\x1f")  # none of the kinds
    (d / "random.bin").write_bytes(noise)
    (d / "empty.pth").write_bytes(b"")
    torch.save({"state_dict": {"w": torch.ones(256)}}, d / "whole.pth")
    (d / "truncated.pth").write_bytes((d / "whole.pth").read_bytes()[:700])
    with zipfile.ZipFile(d / "wrong.zip", "w") as z:
        z.writestr("model/weights.txt", "1 2 3")
    (d / "class.pkl").write_bytes(pickle.dumps({"state_dict": _Marker}))
    torch.save({"state_dict": {"w": _Marker()}}, d / "object.pth")
    return {
        "text": (d / "passwd", "is not a PyTorch checkpoint: it is a text file"),
        "jpeg": (d / "image.jpg", "is not a PyTorch checkpoint: it is a JPEG image"),
        "random bytes": (
            d / "random.bin",
            "is not a PyTorch checkpoint: it is neither a zip archive nor a pickle",
        ),
        "empty": (
            d / "empty.pth",
            "is empty (0 bytes): it is not a PyTorch checkpoint",
        ),
        "truncated": (d / "truncated.pth", "is truncated or damaged"),
        "wrong zip": (d / "wrong.zip", "is a zip archive but not a PyTorch checkpoint"),
        "pickle of a class": (
            d / "class.pkl",
            "is a pickle but not a PyTorch checkpoint: torch.save did not write it",
        ),
        "torch.save of an object": (
            d / "object.pth",
            "was refused: it holds objects other than tensors",
        ),
    }


def run_program(monkeypatch, capsys, main, parser, argv):
    """A program's main through the project's CLI wrapper: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["program", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_cli(main, parser)
    return e.value.code, capsys.readouterr().err


def test_every_program_refuses_a_file_that_is_not_a_checkpoint_in_one_line(
    tmp_path, monkeypatch, capsys
):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=1, size=8)
    out = tmp_path / "out"
    # the models built before a file is read need no random weights: their
    # initialisation would be most of this test's time
    for name in ("kaiming_normal_", "kaiming_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
    small = ["-a", "resnet18", "--small-stem", "-j", "0", "--output-dir", out]
    programs = {
        "main_lincls.py --pretrained": (
            main_lincls.main,
            main_lincls.get_args_parser,
            lambda f: [*small, "--pretrained", f, data],
        ),
        "main_lincls.py --resume": (
            main_lincls.main,
            main_lincls.get_args_parser,
            lambda f: [*small, "--resume", f, data],
        ),
        "main_knn.py --pretrained": (
            main_knn.main,
            main_knn.get_args_parser,
            lambda f: ["-a", "resnet18", "-j", "0", "--pretrained", f, data],
        ),
        "main_moco.py --resume": (
            main_moco.main,
            main_moco.get_args_parser,
            lambda f: [*small, "-b", "8", "--moco-k", "64", "--resume", f, data],
        ),
        "convert-pretrain-to-detectron2.py": (
            convert.main,
            lambda: convert.get_args_parser("detectron2"),
            lambda f: [f, out / "converted.pkl"],
        ),
    }
    for kind, (path, says) in not_checkpoints(tmp_path).items():
        for program, (main, parser, argv) in programs.items():
            code, err = run_program(monkeypatch, capsys, main, parser(), argv(path))
            case = f"{program} given {kind}: {err!r}"
            assert code == 2, case
            assert err.startswith("error: ") and err.count("\n") == 1, case
            assert "Traceback" not in err and f"{str(path)!r} {says}" in err, case
    assert not os.path.exists("/nonexistent/unpickled")
    assert not out.exists() or os.listdir(out) == []  # nothing written


def test_both_formats_of_torch_save_load(tmp_path):
    """The zip format and the legacy one (torch < 1.6: the original's released models)."""
    state = {"epoch": 200, "state_dict": {"module.encoder_q.w": torch.arange(6.0)}}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pth").read_bytes()[:2] == b"\x80\x02"  # a pickle
    for name in ("zip.pth", "legacy.pth"):
        loaded = load_checkpoint(str(tmp_path / name))
        assert loaded["epoch"] == 200, name
        assert torch.equal(
            loaded["state_dict"]["module.encoder_q.w"], torch.arange(6.0)
        )
