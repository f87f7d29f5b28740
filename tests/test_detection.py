"""Detection transfer: the detectron2 converter, the torchvision export, the configs."""

import argparse
import functools
import importlib.util
import os
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from detection import convert
from moco.builder import MoCo
from moco.checkpoint import CheckpointError
from moco.models import build_encoder
from moco.utils import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTION = os.path.join(ROOT, "detection")
CONVERTER = os.path.join(DETECTION, "convert-pretrain-to-detectron2.py")

BLOCKS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}
NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


def detectron2_resnet_names(depth):
    """
    {detectron2 name: torchvision name} of detectron2's ResNet of this depth, written
    from detectron2's naming scheme: the stem's stem.conv1; stages res2..res5 of
    BasicBlock (conv1, conv2) below 50 layers, of BottleneckBlock (conv1..conv3) from
    50; a `shortcut` conv on the first block of a stage that changes the channels (all
    but res2 of basic blocks); every conv with its norm as `<conv>.norm`. BatchNorm's
    num_batches_tracked is left out: FrozenBN has none, BN and SyncBN fill it in.
    """
    names = {}

    def conv(d2, tv_conv, tv_bn):
        names[f"{d2}.weight"] = f"{tv_conv}.weight"
        for field in NORM_FIELDS:
            names[f"{d2}.norm.{field}"] = f"{tv_bn}.{field}"

    conv("stem.conv1", "conv1", "bn1")
    convs = (1, 2, 3) if depth >= 50 else (1, 2)
    for stage, blocks in enumerate(BLOCKS[depth]):
        for b in range(blocks):
            d2, tv = f"res{stage + 2}.{b}", f"layer{stage + 1}.{b}"
            for c in convs:
                conv(f"{d2}.conv{c}", f"{tv}.conv{c}", f"{tv}.bn{c}")
            if b == 0 and (depth >= 50 or stage > 0):
                conv(f"{d2}.shortcut", f"{tv}.downsample.0", f"{tv}.downsample.1")
    return names


def randomize_(module):
    """Distinct values in every tensor, so that a swapped tensor cannot go unnoticed."""
    with torch.no_grad():
        for i, t in enumerate(module.state_dict().values()):
            if t.is_floating_point():
                t.uniform_(0.5, 1.5).add_(i)
            else:
                t.fill_(i)


def moco_checkpoint(arch, mlp):
    """A pretraining checkpoint as main_moco.py writes it, and the query encoder."""
    torch.manual_seed(0)
    model = MoCo(functools.partial(build_encoder, arch), dim=16, K=32, mlp=mlp)
    randomize_(model.encoder_q)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    state_dict = {"module." + k: v for k, v in model.state_dict().items()}
    ckpt = {
        "epoch": 200,
        "arch": arch,
        "state_dict": state_dict,
        "optimizer": optimizer.state_dict(),
    }
    return ckpt, model.encoder_q.state_dict()


def backbone_of(encoder):
    return {k: v for k, v in encoder.items() if not k.startswith("fc.")}


def run(input, output, fmt="detectron2", force=False):
    args = argparse.Namespace(
        input=str(input), output=str(output), force=force, format=fmt
    )
    return convert.main(args)


def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A ResNet-18 MoCo pretraining file, its query encoder, and a linear classifier."""
    ckpt, encoder = moco_checkpoint("resnet18", mlp=False)
    path = tmp_path_factory.mktemp("r18") / "checkpoint_0199.pth.tar"
    torch.save(ckpt, path)
    classifier = {"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}
    return path, encoder, classifier


def test_detectron2_file_of_resnet50_has_detectron2_names_and_the_source_arrays(
    tmp_path, capsys
):
    ckpt, encoder = moco_checkpoint("resnet50", mlp=True)
    torch.save(ckpt, tmp_path / "in.pth.tar")
    run(tmp_path / "in.pth.tar", tmp_path / "out.pkl")

    out = read_pickle(tmp_path / "out.pkl")
    assert out["__author__"] == "MOCO" and out["matching_heuristics"] is True
    expected = detectron2_resnet_names(50)
    # every name, and only those: no stem.fc.*, no num_batches_tracked
    assert set(out["model"]) == set(expected)
    assert not any(k.endswith("num_batches_tracked") for k in out["model"])
    for d2, tv in expected.items():
        source = encoder[tv].numpy()
        assert type(out["model"][d2]) is np.ndarray
        assert out["model"][d2].dtype == source.dtype, d2
        np.testing.assert_array_equal(out["model"][d2], source, err_msg=d2)
    printed = capsys.readouterr().out
    assert "ResNet-50 (bottleneck blocks 3-4-6-3) under 'module.encoder_q.'" in printed
    assert "left out fc.* (4 tensors, the MoCo projection head)" in printed
    # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in fc
    assert "265 tensors, 23,508,032 parameters" in printed


def test_detectron2_file_of_resnet18_uses_basic_block_names(r18, tmp_path, capsys):
    path, encoder, _ = r18
    run(path, tmp_path / "out.pkl")
    out = read_pickle(tmp_path / "out.pkl")["model"]
    expected = detectron2_resnet_names(18)
    assert set(out) == set(expected)
    assert not any(".conv3." in k for k in out) and "res2.0.shortcut.weight" not in out
    for d2, tv in expected.items():
        np.testing.assert_array_equal(out[d2], encoder[tv].numpy(), err_msg=d2)
    printed = capsys.readouterr().out
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in fc
    assert "100 tensors, 11,176,512 parameters" in printed
    assert "MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64" in printed


@pytest.mark.parametrize("depth", sorted(BLOCKS))
def test_every_resnet_depth_maps_onto_detectron2_names(depth):
    with torch.device("meta"):  # names and shapes only, no memory
        model = torchvision.models.get_model(f"resnet{depth}")
    backbone = convert.read_backbone(model.state_dict())
    assert backbone.depth == depth and list(backbone.blocks) == BLOCKS[depth]
    mapping = {
        convert.detectron2_name(k): k
        for k in backbone.state_dict
        if not k.endswith("num_batches_tracked")
    }
    assert mapping == detectron2_resnet_names(depth)


def test_pickle_reads_with_any_numpy(r18, tmp_path):
    """NumPy 2 pickles arrays under numpy._core, which NumPy 1.x cannot import."""
    run(r18[0], tmp_path / "out.pkl")
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    with open(tmp_path / "out.pkl", "rb") as f:
        model = Recorder(f, encoding="latin1").load()["model"]  # as detectron2 reads it
    assert found == {("numpy", "ndarray"), ("builtins", "bytearray")}
    assert all(a.flags.writeable and a.flags.c_contiguous for a in model.values())


def flavours(encoder, classifier):
    """The same ResNet-18 in every checkpoint flavour the converter reads."""
    backbone = backbone_of(encoder)
    head = {k: v for k, v in encoder.items() if k.startswith("fc.")}
    v3_head = {"fc.0.weight": torch.randn(8, 512), "fc.1.weight": torch.ones(8)}
    optimizer = {"state": {}, "param_groups": []}
    return {
        "encoder_q without DDP": {
            "state_dict": {"encoder_q." + k: v for k, v in encoder.items()}
        },
        "MoCo v3": {
            "epoch": 100,
            "arch": "resnet18",
            "state_dict": {
                **{
                    "module.base_encoder." + k: v
                    for k, v in {**backbone, **v3_head}.items()
                },
                **{
                    "module.momentum_encoder." + k: v
                    for k, v in {**backbone, **v3_head}.items()
                },
                "module.predictor.0.weight": torch.randn(8, 8),
            },
            "optimizer": optimizer,
        },
        "linear classification": {
            "epoch": 100,
            "arch": "resnet18",
            "state_dict": {
                "module." + k: v for k, v in {**backbone, **classifier}.items()
            },
            "best_acc1": 50.0,
            "optimizer": optimizer,
        },
        "torchvision state_dict": {**backbone, **classifier},
        "projection head kept": {**backbone, **head},
    }


def test_every_flavour_converts_to_the_same_file(r18, tmp_path):
    path, encoder, classifier = r18
    run(path, tmp_path / "reference.pkl")
    reference = read_pickle(tmp_path / "reference.pkl")["model"]
    for i, (name, ckpt) in enumerate(flavours(encoder, classifier).items()):
        torch.save(ckpt, tmp_path / f"{i}.pth")
        run(tmp_path / f"{i}.pth", tmp_path / f"{i}.pkl")
        model = read_pickle(tmp_path / f"{i}.pkl")["model"]
        assert model.keys() == reference.keys(), name
        for k in reference:
            np.testing.assert_array_equal(
                model[k], reference[k], err_msg=f"{name}: {k}"
            )


def test_torchvision_export_of_pretraining_file_loads_strictly_without_fc(
    r18, tmp_path, capsys
):
    path, encoder, _ = r18
    run(path, tmp_path / "r18.pth", fmt="torchvision")
    state_dict = torch.load(tmp_path / "r18.pth", weights_only=True)
    assert not any(k.startswith("fc.") for k in state_dict)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()  # the projection head is not exported
    model.load_state_dict(state_dict, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, encoder[k]), k
    printed = capsys.readouterr().out
    assert "left out fc.* (2 tensors, the MoCo projection head)" in printed


def test_torchvision_export_of_linear_classifier_keeps_its_fc(r18, tmp_path, capsys):
    _, encoder, classifier = r18
    lincls = flavours(encoder, classifier)["linear classification"]
    torch.save(lincls, tmp_path / "lin.pth.tar")
    run(tmp_path / "lin.pth.tar", tmp_path / "r18.pth", fmt="torchvision")
    state_dict = torch.load(tmp_path / "r18.pth", weights_only=True)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(state_dict, strict=True)
    expected = {**backbone_of(encoder), **classifier}
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert "left out" not in capsys.readouterr().out


def test_small_stem_is_refused_for_detectron2_but_exported_for_torchvision(tmp_path):
    encoder = build_encoder("resnet18", small_stem=True)
    torch.save(encoder.state_dict(), tmp_path / "in.pth")
    with pytest.raises(UsageError, match="7x7"):
        run(tmp_path / "in.pth", tmp_path / "out.pkl")
    assert not (tmp_path / "out.pkl").exists()
    run(tmp_path / "in.pth", tmp_path / "out.pth", fmt="torchvision")
    encoder.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"epoch": 3, "state_dict": {}}, "no encoder"),
        (
            {"state_dict": {"model.encoder_q.conv1.weight": torch.ones(1)}},
            "unknown prefix",
        ),
        ({"epoch": 3, "optimizer": {}}, "no state_dict"),
        (nn.Linear(4, 2).state_dict(), "not hold a torchvision ResNet"),
        ({"module.fc.weight": torch.ones(2, 2)}, "incomplete ResNet"),
    ],
)
def test_file_without_a_resnet_encoder_is_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "in.pth")
    with pytest.raises(CheckpointError, match=message):
        run(tmp_path / "in.pth", tmp_path / "out.pkl")
    assert os.listdir(tmp_path) == ["in.pth"]


def test_missing_input_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run(tmp_path / "missing.pth.tar", tmp_path / "out.pkl")
    assert not (tmp_path / "out.pkl").exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save(
        {"state_dict": {"conv1.weight": torch.ones(1)}, "x": _RunsCode(str(marker))},
        tmp_path / "in.pth",
    )
    with pytest.raises(CheckpointError, match="refused"):
        run(tmp_path / "in.pth", tmp_path / "out.pkl")
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


def test_existing_output_is_kept_unless_forced(r18, tmp_path):
    out = tmp_path / "out.pkl"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="--force"):
        run(r18[0], out)
    assert out.read_bytes() == b"keep me"
    run(r18[0], out, force=True)
    assert read_pickle(out)["__author__"] == "MOCO"


def test_output_that_is_the_input_is_refused_even_with_force(r18, tmp_path):
    path = tmp_path / "in.pth.tar"
    path.write_bytes(r18[0].read_bytes())
    with pytest.raises(UsageError, match="is the input"):
        run(path, path, force=True)
    assert path.read_bytes() == r18[0].read_bytes()


def test_failed_write_leaves_no_partial_file(r18, tmp_path, monkeypatch):
    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "_write_pickle", full_disk)
    with pytest.raises(CheckpointError, match="no space left to write"):
        run(r18[0], tmp_path / "out.pkl")
    assert os.listdir(tmp_path) == []
    (tmp_path / "out.pkl").write_bytes(b"previous")
    with pytest.raises(CheckpointError, match="no space left to write"):
        run(r18[0], tmp_path / "out.pkl", force=True)
    assert os.listdir(tmp_path) == ["out.pkl"]
    assert (tmp_path / "out.pkl").read_bytes() == b"previous"


def test_original_command_line_works_inside_detection_and_errors_in_one_line(
    r18, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "output.pkl"
    cmd = [sys.executable, "convert-pretrain-to-detectron2.py", str(r18[0]), str(out)]
    done = subprocess.run(cmd, cwd=DETECTION, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {str(out)!r} (detectron2): 100 tensors" in done.stdout
    assert set(read_pickle(out)["model"]) == set(detectron2_resnet_names(18))

    # again, from the root: the script run as __main__ in this process
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", [CONVERTER, str(r18[0]), str(out)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(CONVERTER, run_name="__main__")
    stderr = capsys.readouterr().err
    assert e.value.code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "--force" in stderr


@pytest.mark.skipif(
    importlib.util.find_spec("detectron2") is not None, reason="detectron2 installed"
)
def test_train_net_without_detectron2_says_how_to_install_it():
    train_net = os.path.join(DETECTION, "train_net.py")
    cmd = [sys.executable, train_net, "--config-file", "x.yaml"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    install = "pip install 'git+https://github.com/facebookresearch/detectron2.git'"
    assert install in done.stderr


def read_config(name):
    """A config of detection/configs as {"A.B.C": "value"}, its _BASE_ merged in."""
    flat, keys = {}, []
    with open(os.path.join(DETECTION, "configs", name)) as f:
        for line in f:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            depth = (len(line) - len(line.lstrip())) // 2
            key, _, value = line.strip().partition(":")
            keys[depth:] = [key]
            if value.strip():
                flat[".".join(keys)] = value.strip().strip('"')
    base = flat.pop("_BASE_", None)
    return {**read_config(base), **flat} if base else flat


MOCO_INPUT = {
    "MODEL.PIXEL_MEAN": "[123.675, 116.280, 103.530]",
    "MODEL.PIXEL_STD": "[58.395, 57.120, 57.375]",
    "MODEL.RESNETS.STRIDE_IN_1X1": "False",
    "INPUT.FORMAT": "RGB",
    "MODEL.WEIGHTS": "See Instructions",
}
C4_BN = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.BACKBONE.FREEZE_AT": "0",
    "TEST.PRECISE_BN.ENABLED": "True",
    "SOLVER.IMS_PER_BATCH": "16",
    "SOLVER.BASE_LR": "0.02",
}


def test_voc_config_is_the_24k_r50_c4_recipe_with_torchvision_input():
    cfg = read_config("pascal_voc_R_50_C4_24k_moco.yaml")
    expected = {
        **C4_BN,
        **MOCO_INPUT,
        "MODEL.MASK_ON": "False",
        "MODEL.ROI_HEADS.NUM_CLASSES": "20",
        "DATASETS.TRAIN": '("voc_2007_trainval", "voc_2012_trainval")',
        "DATASETS.TEST": '("voc_2007_test",)',
        "SOLVER.STEPS": "(18000, 22000)",
        "SOLVER.MAX_ITER": "24000",
        "SOLVER.WARMUP_ITERS": "100",
    }
    assert {k: cfg.get(k) for k in expected} == expected


def test_coco_config_is_the_2x_r50_c4_mask_rcnn_recipe_with_torchvision_input():
    cfg = read_config("coco_R_50_C4_2x_moco.yaml")
    expected = {
        **C4_BN,
        **MOCO_INPUT,
        "MODEL.MASK_ON": "True",
        "DATASETS.TRAIN": '("coco_2017_train",)',
        "DATASETS.TEST": '("coco_2017_val",)',
        "SOLVER.STEPS": "(120000, 160000)",
        "SOLVER.MAX_ITER": "180000",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    supervised = read_config("coco_R_50_C4_2x.yaml")  # Caffe2 weights keep the defaults
    assert "INPUT.FORMAT" not in supervised and "MODEL.PIXEL_MEAN" not in supervised


def test_converted_resnet50_loads_into_detectron2_c4_model(tmp_path):
    """With detectron2 installed: every backbone and res5 tensor of the model loads."""
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from detection import train_net  # registers Res5ROIHeadsExtraNorm

    ckpt, encoder = moco_checkpoint("resnet50", mlp=True)
    torch.save(ckpt, tmp_path / "in.pth.tar")
    run(tmp_path / "in.pth.tar", tmp_path / "out.pkl")

    args = argparse.Namespace(
        config_file=os.path.join(
            DETECTION, "configs", "pascal_voc_R_50_C4_24k_moco.yaml"
        ),
        # BN on one CPU process instead of SyncBN: the same names
        opts=[
            "MODEL.DEVICE",
            "cpu",
            "MODEL.RESNETS.NORM",
            "BN",
            "MODEL.WEIGHTS",
            str(tmp_path / "out.pkl"),
        ],
    )
    cfg = train_net.build_cfg(args)
    model = build_model(cfg)
    assert isinstance(model.roi_heads, train_net.Res5ROIHeadsExtraNorm)
    assert isinstance(model.roi_heads.res5.norm, nn.BatchNorm2d)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)

    state = model.state_dict()
    expected = detectron2_resnet_names(50)
    for d2, tv in expected.items():
        key = ("roi_heads." if d2.startswith("res5.") else "backbone.") + d2
        assert torch.equal(state[key], encoder[tv]), key
