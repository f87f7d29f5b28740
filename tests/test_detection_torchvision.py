"""Detection transfer with torchvision's Faster R-CNN: detection/train_torchvision.py."""

import copy
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from detection import datasets, detector, evaluate
from detection import train_torchvision as det
from detection.voc_shapes import make_voc_shapes
from moco.cli import run_cli
from moco.distributed import DistEnv
from moco.models import build_encoder
from moco.utils import UsageError

try:
    import pycocotools.cocoeval  # noqa: F401

    HAVE_PYCOCOTOOLS = True
except ImportError:
    HAVE_PYCOCOTOOLS = False
needs_pycocotools = pytest.mark.skipif(
    not HAVE_PYCOCOTOOLS,
    reason="pycocotools is not installed (pip install -r detection/requirements.txt)",
)

# ImageNet's mean and std, as MoCo normalised its inputs (torchvision's RGB in [0, 1])
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# the generated set: 64 px images, 24 + 8 training and 8 test images
SIZE = 64
COUNTS = {("2007", "trainval"): 24, ("2012", "trainval"): 8, ("2007", "test"): 8}
# a detector small enough for the CPU: 64 px images, few proposals and samples
TINY = [
    "-b",
    "2",
    "-j",
    "0",
    "--min-size",
    str(SIZE),
    "--max-size",
    str(SIZE),
    "--precise-bn",
    "2",
    "-p",
    "1",
    "--seed",
    "0",
    "--detector-opt",
    "rpn_pre_nms_top_n_train=200",
    "rpn_post_nms_top_n_train=100",
    "rpn_pre_nms_top_n_test=100",
    "rpn_post_nms_top_n_test=50",
    "rpn_batch_size_per_image=64",
    "box_batch_size_per_image=16",
]


def moco_file(path, arch="resnet50", distinct=False, small_stem=False, whole=True):
    """
    A pretraining file as main_moco.py writes it (MoCo v2's MLP head, module.*
    names) of a random `arch`; returns its query encoder's backbone (fc left out).
    distinct: every tensor's values differ from every other's, so that a tensor
    loaded into the wrong place cannot go unnoticed. whole: with the key encoder and
    the queue (without, the file is half as large and reads the same).
    """
    torch.manual_seed(0)
    encoder = build_encoder(arch, num_classes=16, small_stem=small_stem)
    dim = encoder.fc.in_features
    encoder.fc = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 16))
    state = encoder.state_dict()
    if distinct:
        with torch.no_grad():
            for i, t in enumerate(state.values()):
                if t.is_floating_point():
                    t.uniform_(0.5, 1.5).add_(i)
                else:
                    t.fill_(i)
    encoders = "qk" if whole else "q"
    sd = {f"module.encoder_{e}.{k}": v for e in encoders for k, v in state.items()}
    if whole:
        sd["module.queue"] = nn.functional.normalize(torch.randn(16, 64), dim=0)
        sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 1, "arch": arch, "state_dict": sd, "optimizer": {}}, path)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """The generated set in VOC's layout: the folder holding VOCdevkit/."""
    return str(make_voc_shapes(tmp_path_factory.mktemp("voc"), COUNTS, SIZE))


@pytest.fixture(scope="module")
def moco_r50(tmp_path_factory):
    path = tmp_path_factory.mktemp("moco") / "checkpoint_0199.pth.tar"
    moco_file(path)
    return str(path)


@pytest.fixture(scope="module")
def distinct_r50(tmp_path_factory):
    """A ResNet-50 MoCo file of distinct tensors, and its backbone."""
    path = tmp_path_factory.mktemp("distinct") / "checkpoint_0199.pth.tar"
    return str(path), moco_file(path, distinct=True, whole=False)


def det_args(data, out, *extra):
    argv = [str(data), *TINY, "--output-dir", str(out), *map(str, extra)]
    return det.get_args_parser().parse_args(argv)


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# the model -----------------------------------------------------------------------


def no_weights(*args, **kwargs):
    raise AssertionError("pretrained weights were asked for")


@pytest.fixture(scope="module")
def loaded(distinct_r50):
    """
    A detector built where asking for torchvision's pretrained weights (downloaded or
    cached) fails, its backbone loaded from distinct_r50; and the random backbone it
    had before.
    """
    from torchvision.models._api import WeightsEnum

    path, _ = distinct_r50
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WeightsEnum, "get_state_dict", no_weights)
        patch.setattr(torch.hub, "load_state_dict_from_url", no_weights)
        patch.setattr(torch.hub, "download_url_to_file", no_weights)
        model = detector.build_detector(21, min_size=SIZE, max_size=SIZE)
    random = {k: v.clone() for k, v in model.backbone.body.state_dict().items()}
    n = detector.load_backbone(model, detector.read_resnet50(path), path)
    return model, n, random


def test_every_backbone_tensor_comes_from_the_checkpoint(distinct_r50, loaded):
    _, backbone = distinct_r50
    model, n, random = loaded
    body = model.backbone.body.state_dict()
    # torchvision's resnet50 without fc: 53 convolutions, 53 BatchNorms of 5 tensors
    assert n == len(backbone) == len(body) == 53 + 53 * 5
    for k, v in backbone.items():
        assert torch.equal(body[k], v), k
    # built without pretrained weights: the backbone was random before
    assert not torch.equal(random["conv1.weight"], backbone["conv1.weight"])


def test_batchnorm_trains_every_stage_trains_and_inputs_are_normalised_as_moco(
    loaded,
):
    model = loaded[0]
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    # every BatchNorm of the ResNet-50, trained: with ImageNet weights torchvision
    # freezes BatchNorm (FrozenBatchNorm2d), the stem and layer1
    assert len(norms) == 53
    assert all(type(m) is nn.BatchNorm2d for m in norms)
    assert all(p.requires_grad for p in model.parameters())
    assert model.transform.image_mean == IMAGENET_MEAN
    assert model.transform.image_std == IMAGENET_STD


def test_batchnorm_is_synchronised_across_gpu_processes_only(distinct_r50, loaded):
    _, backbone = distinct_r50
    model = copy.deepcopy(loaded[0])
    assert not detector.sync_batchnorm(model, False, torch.device("cuda"))
    assert not detector.sync_batchnorm(model, True, torch.device("cpu"))
    assert all(type(m) is not nn.SyncBatchNorm for m in model.modules())
    assert detector.sync_batchnorm(model, True, torch.device("cuda"))
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert len(norms) == 53 and all(type(m) is nn.SyncBatchNorm for m in norms)
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in backbone.items())


def test_batchnorm_has_no_weight_decay_and_everything_else_has(loaded):
    model = loaded[0]
    decayed, exempt = detector.parameter_groups(model, 1e-4)
    assert decayed["weight_decay"] == 1e-4 and exempt["weight_decay"] == 0.0
    bn = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
    }
    assert {id(p) for p in exempt["params"]} == bn and len(bn) == 2 * 53
    assert len(decayed["params"]) + len(exempt["params"]) == len(
        list(model.parameters())
    )


def test_learning_rate_is_detectron2s_warmup_multistep():
    # detectron2's WarmupMultiStepLR: base * 0.1^(steps passed) * warm-up factor,
    # the factor 1/1000 * (1 - it/W) + it/W for it < W
    steps, lr = (18000, 22000), 0.02
    expected = {
        0: 0.02 * 0.001,
        50: 0.02 * (0.001 * 0.5 + 0.5),
        99: 0.02 * (0.001 * 0.01 + 0.99),
        100: 0.02,
        17999: 0.02,
        18000: 0.002,
        21999: 0.002,
        22000: 0.0002,
        23999: 0.0002,
    }
    for it, value in expected.items():
        assert detector.learning_rate(it, lr, steps, 100) == pytest.approx(value), it


def test_defaults_are_the_papers_voc_and_coco_schedules(voc):
    args = det.with_defaults(det.get_args_parser().parse_args([voc]))
    assert (args.iters, args.steps, args.warmup_iters) == (24000, [18000, 22000], 100)
    assert (args.batch_size, args.lr, args.weight_decay) == (16, 0.02, 1e-4)
    assert args.train_sets == ["2007-trainval", "2012-trainval"]
    assert args.test_set == "2007-test"
    # testing at the last: 800
    assert args.min_size == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert args.max_size == 1333 and args.precise_bn == 200
    coco = det.with_defaults(
        det.get_args_parser().parse_args([voc, "--dataset", "coco"])
    )
    assert (coco.iters, coco.steps, coco.warmup_iters) == (
        180000,
        [120000, 160000],
        1000,
    )
    assert coco.train_sets == ["train2017"] and coco.test_set == "val2017"


# data and evaluation ---------------------------------------------------------------


def write_voc(root, images, image_set="test", year="2007", size=32):
    """
    A VOC split by hand: images {name: [(class, (xmin, ymin, xmax, ymax), difficult)]}
    in VOC's XML, and blank JPEGs.
    """
    from PIL import Image

    folder = os.path.join(root, "VOCdevkit", f"VOC{year}")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for name, objects in images.items():
        Image.new("RGB", (size, size)).save(
            os.path.join(folder, "JPEGImages", f"{name}.jpg")
        )
        xml = [f"<annotation><size><width>{size}</width><height>{size}</height></size>"]
        for cls, (x0, y0, x1, y1), difficult in objects:
            xml.append(
                f"<object><name>{cls}</name><difficult>{int(difficult)}</difficult>"
                f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                f"<ymax>{y1}</ymax></bndbox></object>"
            )
        with open(os.path.join(folder, "Annotations", f"{name}.xml"), "w") as f:
            f.write("".join(xml) + "</annotation>")
    with open(os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt"), "w") as f:
        f.write("".join(n + "\n" for n in images))
    return str(root)


# a 4x4-pixel cat at pixels 11..14 (VOC counts from 1), a difficult dog, a person
HAND = {
    "a": [("cat", (11, 11, 14, 14), False), ("dog", (2, 2, 9, 20), True)],
    "b": [("person", (5, 6, 25, 30), False)],
}


def rows(dataset, boxes):
    """detect's rows for {sample index: [(box x0 y0 x1 y1, label, score)]}."""
    out = []
    for i, dets in boxes.items():
        for (x0, y0, x1, y1), label, score in dets:
            out.append([dataset.image_id(i), x0, y0, x1 - x0, y1 - y0, score, label])
    return np.array(out, dtype=float).reshape(-1, 7)


def test_voc_boxes_are_read_as_pixel_extents_from_zero(tmp_path):
    ds = datasets.DetectionSet("voc", write_voc(tmp_path, HAND), ["2007-test"], False)
    image, target = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    # pixels 11..14 from 1 are 10..13 from 0: the box from 10 to 14, 4 pixels wide
    assert target["boxes"].tolist() == [[10, 10, 14, 14], [1, 1, 9, 20]]
    # VOC's classes in their order from 1: cat is the 8th, dog the 12th
    assert target["labels"].tolist() == [8, 12]
    assert ds[1][1]["labels"].tolist() == [15]


@needs_pycocotools
def test_ap_of_exact_boxes_is_100_and_difficult_objects_neither_count_nor_cost(
    tmp_path,
):
    ds = datasets.DetectionSet("voc", write_voc(tmp_path, HAND), ["2007-test"], False)
    gt, ids = ds.ground_truth(), [0, 1]
    cat, person = ((10, 10, 14, 14), 8, 0.9), ((4, 5, 25, 30), 15, 0.8)
    # AP at IoU 0.95 too: the 4-pixel box is matched exactly or not at all
    exact = evaluate.coco_ap(gt, rows(ds, {0: [cat], 1: [person]}), ids)
    assert exact == pytest.approx({"AP": 100, "AP50": 100, "AP75": 100, "APs": 100})
    # the difficult dog found: no false positive either
    dog = ((1, 1, 9, 20), 12, 0.95)
    found = evaluate.coco_ap(gt, rows(ds, {0: [cat, dog], 1: [person]}), ids)
    assert found["AP"] == pytest.approx(100)
    # a cat a pixel off (IoU 12/20 = 0.6): found at IoU 0.5, not at 0.75
    off = ((11, 10, 15, 14), 8, 0.9)
    shifted = evaluate.coco_ap(gt, rows(ds, {0: [off], 1: [person]}), ids)
    # mean over the classes found (cat, person); the cat's AP75 is 0
    assert shifted["AP50"] == pytest.approx(100)
    assert shifted["AP75"] == pytest.approx(50)


@needs_pycocotools
def test_no_detection_at_all_scores_zero(tmp_path):
    ds = datasets.DetectionSet("voc", write_voc(tmp_path, HAND), ["2007-test"], False)
    stats = evaluate.coco_ap(ds.ground_truth(), rows(ds, {}), [0, 1])
    assert stats == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def write_coco(root, split, images, annotations, categories):
    """COCO's layout: annotations/instances_<split>.json and <split>/<images>."""
    from PIL import Image

    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"])).save(
            os.path.join(root, split, im["file_name"])
        )
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(
            {"images": images, "annotations": annotations, "categories": categories}, f
        )
    return str(root)


COCO_IMAGES = [
    {"id": 7, "file_name": "7.jpg", "width": 40, "height": 30},
    {"id": 9, "file_name": "9.jpg", "width": 30, "height": 40},
    {"id": 12, "file_name": "12.jpg", "width": 30, "height": 30},
]
COCO_ANNOTATIONS = [
    # (x, y, w, h) boxes; categories with gaps in their ids, as COCO's
    {
        "id": 1,
        "image_id": 7,
        "category_id": 5,
        "bbox": [2, 3, 10, 20],
        "area": 200,
        "iscrowd": 0,
    },
    {
        "id": 2,
        "image_id": 7,
        "category_id": 90,
        "bbox": [20, 5, 15, 15],
        "area": 225,
        "iscrowd": 0,
    },
    {
        "id": 3,
        "image_id": 9,
        "category_id": 90,
        "bbox": [0, 0, 30, 40],
        "area": 1200,
        "iscrowd": 1,
    },
]
COCO_CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}]


@needs_pycocotools
def test_coco_labels_run_from_1_over_its_category_ids_and_crowds_are_not_objects(
    tmp_path,
):
    data = write_coco(
        tmp_path, "val2017", COCO_IMAGES, COCO_ANNOTATIONS, COCO_CATEGORIES
    )
    test = datasets.DetectionSet("coco", data, ["val2017"], train=False)
    train = datasets.DetectionSet("coco", data, ["val2017"], train=True)
    assert test.classes == ("airplane", "toothbrush")  # by category id
    image, target = test[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 7
    assert target["boxes"].tolist() == [[2, 3, 12, 23], [20, 5, 35, 20]]
    assert target["labels"].tolist() == [1, 2]
    assert [test.category_id(label) for label in (1, 2)] == [5, 90]
    # image 9 has only a crowd, image 12 nothing: evaluated, but not trained on
    assert [test.image_id(i) for i in range(len(test))] == [7, 9, 12]
    assert [train.image_id(i) for i in range(len(train))] == [7]
    assert test[1][1]["boxes"].shape == (0, 4)


class Oracle(nn.Module):
    """A 'detector' that answers each image with its ground-truth boxes."""

    def __init__(self, dataset):
        super().__init__()
        self.answers = {}
        for i in range(len(dataset)):
            image, target = dataset[i]
            key = (tuple(image.shape), float(image.sum()))
            assert key not in self.answers
            self.answers[key] = target
        self.calls = 0

    def forward(self, images):
        self.calls += len(images)
        target = self.answers[(tuple(images[0].shape), float(images[0].sum()))]
        n = len(target["labels"])
        return [{**target, "scores": torch.linspace(0.9, 0.5, n)}]


@needs_pycocotools
def test_evaluation_detects_each_image_once_and_maps_labels_back(tmp_path):
    from PIL import Image

    data = write_coco(
        tmp_path, "val2017", COCO_IMAGES, COCO_ANNOTATIONS, COCO_CATEGORIES
    )
    for im, value in zip(COCO_IMAGES, (50, 100, 150)):  # images the oracle tells apart
        Image.new("RGB", (im["width"], im["height"]), (value,) * 3).save(
            os.path.join(data, "val2017", im["file_name"])
        )
    test = datasets.DetectionSet("coco", data, ["val2017"], train=False)
    oracle = Oracle(test)
    stats = evaluate.evaluate(oracle, test, DistEnv(), workers=0)
    assert oracle.calls == 3
    assert [stats[k] for k in ("AP", "AP50", "AP75")] == pytest.approx([100] * 3)
    assert stats["images"] == 3


# bad input: one line each, before any process starts ---------------------------------


def usage_error(data, out, *extra):
    # one iteration: a check that let the run start ends the test soon
    with pytest.raises(UsageError) as e:
        det.main(det_args(data, out, "--iters", 1, *extra))
    text = str(e.value)
    assert "\n" not in text
    return text


@needs_pycocotools
def test_a_checkpoint_that_is_not_a_resnet50_is_refused(voc, tmp_path):
    r18 = tmp_path / "r18.pth.tar"
    moco_file(r18, "resnet18", whole=False)
    text = usage_error(voc, tmp_path / "o", "--pretrained", r18)
    assert "a ResNet-18 (basic blocks 2-2-2-2)" in text and "resnet50" in text
    small = tmp_path / "small.pth.tar"
    moco_file(small, small_stem=True, whole=False)
    assert "3x3 stem" in usage_error(voc, tmp_path / "o", "--pretrained", small)
    # ResNet-50's depth and blocks, twice its width in layer1
    resnext = tmp_path / "resnext.pth.tar"
    moco_file(resnext, "resnext50_32x4d", whole=False)
    assert "128 bottleneck channels" in usage_error(
        voc, tmp_path / "o", "--pretrained", resnext
    )
    assert "does not exist" in usage_error(
        voc, tmp_path / "o", "--pretrained", tmp_path / "nope.pth.tar"
    )
    assert not os.path.exists(tmp_path / "o" / det.CHECKPOINT)


@needs_pycocotools
def test_a_missing_annotation_file_is_refused(tmp_path, moco_r50):
    data = write_voc(tmp_path / "voc", HAND)
    write_voc(tmp_path / "voc", HAND, "trainval")
    os.remove(os.path.join(data, "VOCdevkit", "VOC2007", "Annotations", "b.xml"))
    text = usage_error(
        data, tmp_path / "o", "--pretrained", moco_r50, "--train-sets", "2007-trainval"
    )
    assert "annotation file" in text and "b.xml" in text and "does not exist" in text
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    text = usage_error(
        coco, tmp_path / "o", "--pretrained", moco_r50, "--dataset", "coco"
    )
    assert "instances_train2017.json" in text and "does not exist" in text


@needs_pycocotools
def test_a_dataset_folder_in_the_wrong_layout_is_refused(tmp_path, moco_r50):
    pretrained = ("--pretrained", moco_r50)
    assert "does not exist" in usage_error(
        tmp_path / "none", tmp_path / "o", *pretrained
    )
    # detectron2's datasets/VOC2007: the message says how to make VOC's layout
    (tmp_path / "datasets" / "VOC2007").mkdir(parents=True)
    text = usage_error(tmp_path / "datasets", tmp_path / "o", *pretrained)
    assert "detectron2's datasets/ layout" in text and "VOCdevkit" in text
    # VOC2012 missing
    data = write_voc(tmp_path / "voc", HAND, "trainval")
    text = usage_error(data, tmp_path / "o", *pretrained)
    assert "'2012-trainval'" in text and "VOC2012" in text
    # a split the folder does not have
    text = usage_error(data, tmp_path / "o", *pretrained, "--train-sets", "2007-val")
    assert "val.txt" in text and "does not exist" in text


def test_missing_pycocotools_is_one_line_saying_how_to_install_it(
    voc, moco_r50, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)
    text = usage_error(voc, tmp_path / "o", "--pretrained", moco_r50)
    assert "pycocotools" in text and "pip install -r detection/requirements.txt" in text


@needs_pycocotools
def test_impossible_settings_are_refused(voc, moco_r50, tmp_path):
    pretrained = ("--pretrained", moco_r50)
    cases = {
        (): "give --pretrained FILE",
        ("-e",): "--evaluate scores a trained detector",
        (*pretrained, "--steps", "20", "10"): "--steps must increase",
        (*pretrained, "--lr", "0"): "--lr must be positive",
        (*pretrained, "--detector-opt", "box_head=3"): "--detector-opt 'box_head=3'",
        (*pretrained, "--detector-opt", "rpn_nms_thresh"): "expected KEY=VALUE",
        (*pretrained, "--resume", moco_r50): "goes to --pretrained",
    }
    for extra, message in cases.items():
        assert message in usage_error(voc, tmp_path / "o", *extra), extra


@needs_pycocotools
def test_bad_input_ends_with_exit_2_and_one_line(voc, tmp_path, monkeypatch, capsys):
    argv = [voc, "--pretrained", str(tmp_path / "nope.pth"), "--output-dir", tmp_path]
    monkeypatch.setattr("sys.argv", ["train_torchvision.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_cli(det.main, det.get_args_parser())
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: --pretrained") and err.count("\n") == 1, err


# end to end on the CPU -------------------------------------------------------------

# 2 images per step: the paper's lr scaled linearly (0.02 x 2 / 16), a short warm-up
TRAIN = ["--lr", "0.0025", "--warmup-iters", "8"]
# steps of the end-to-end run: enough for the loss to fall; a detector that finds the
# shapes on held-out images takes a few hundred (docs/detection.md)
ITERS = 16


@needs_pycocotools
def test_fine_tuning_a_moco_checkpoint_lowers_the_loss_and_is_evaluated(
    voc, moco_r50, tmp_path
):
    out = tmp_path / "run"
    stats = det.main(
        det_args(voc, out, "--pretrained", moco_r50, *TRAIN, "--iters", ITERS)
    )
    log = records(out)
    assert log[0]["kind"] == "args" and log[0]["iters"] == ITERS
    losses = [r["loss"] for r in log if r["kind"] == "step"]
    assert len(losses) == ITERS
    # from about 5 (the classifier's log 21 and the box losses) down
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.7 * first, (first, last)
    (evaluation,) = [r for r in log if r["kind"] == "eval"]
    assert evaluation == {"kind": "eval", "iter": ITERS, **stats}
    # on the 8 held-out images
    assert stats["images"] == COUNTS[("2007", "test")]
    assert all(0 <= stats[k] <= 100 for k in ("AP", "AP50", "AP75"))
    saved = torch.load(out / det.CHECKPOINT, weights_only=True)
    assert saved["iter"] == ITERS and saved["arch"] == "fasterrcnn_resnet50_fpn"
    assert saved["classes"] == list(datasets.VOC_CLASSES)


class Killed(Exception):
    """The process dying at a given iteration (no checkpoint written after it)."""


def same_checkpoints(a, b):
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert a["iter"] == b["iter"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(
        torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa
    )


SHORT = (*TRAIN, "--iters", "4", "--steps", "3")


@pytest.fixture(scope="module")
def short_run(voc, moco_r50, tmp_path_factory):
    """A 4-iteration run without interruption: its output folder and evaluation."""
    out = tmp_path_factory.mktemp("short")
    return out, det.main(det_args(voc, out, "--pretrained", moco_r50, *SHORT))


@needs_pycocotools
def test_a_killed_and_a_signalled_run_resume_to_the_same_detector(
    voc, moco_r50, short_run, tmp_path, monkeypatch
):
    run = ("--pretrained", moco_r50, *SHORT)

    out = tmp_path / "b"
    step = det.Run.step

    def dies_at(n, then=None):
        def patched(self, images, targets, stop_requested, it):
            if it == n:
                if then is None:
                    raise Killed
                then()
            return step(self, images, targets, stop_requested, it)

        monkeypatch.setattr(det.Run, "step", patched)

    # killed in iteration 3: the checkpoint of iteration 2 (--save-freq 2) is left
    dies_at(3)
    with pytest.raises(Killed):
        det.main(det_args(voc, out, *run, "--save-freq", "2"))
    assert torch.load(out / det.CHECKPOINT, weights_only=True)["iter"] == 2
    # resumed, then SIGTERM in iteration 2: the step after it is the last, saved
    # (the detector of the full run) and the run ends with status 75
    dies_at(2, then=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as e:
        det.main(det_args(voc, out, *run, "--resume", "auto"))
    assert e.value.code == 75
    same_checkpoints(short_run[0] / det.CHECKPOINT, out / det.CHECKPOINT)
    # resumed after the last iteration: the evaluation the signal left out
    monkeypatch.setattr(det.Run, "step", step)
    assert det.main(det_args(voc, out, *run, "--resume", "auto")) == short_run[1]
    steps = [r["iter"] for r in records(out) if r["kind"] == "step"]
    assert steps == [0, 1, 2, 2, 3]


@needs_pycocotools
def test_evaluation_on_two_processes_equals_one_process(voc, short_run, tmp_path):
    from conftest import free_port

    checkpoint, one = short_run[0] / det.CHECKPOINT, short_run[1]
    two = tmp_path / "two"
    det.main(
        det_args(
            voc,
            two,
            "-e",
            "--resume",
            checkpoint,
            "--multiprocessing-distributed",
            "--world-size",
            "1",
            "--rank",
            "0",
            "--procs-per-node",
            "2",
            "--dist-url",
            f"tcp://127.0.0.1:{free_port()}",
        )
    )
    (evaluation,) = [r for r in records(two) if r["kind"] == "eval"]
    assert evaluation == {"kind": "eval", "iter": 4, **one}
