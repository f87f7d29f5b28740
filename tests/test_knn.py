import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import free_port, make_image_folder
from torch.utils.data import TensorDataset

import main_knn
import main_moco
from moco import knn
from moco.distributed import DistEnv
from moco.features import backbone, extract
from moco.models import build_encoder
from moco.utils import UsageError
from moco.weights import load_encoder_with_head


def brute_force_knn(queries, bank, labels, num_classes, k, t):
    """Written out with Python loops: (predicted class, class scores) per query."""
    result = []
    for q in queries.tolist():
        sims = [
            (sum(a * b for a, b in zip(q, row)), i)
            for i, row in enumerate(bank.tolist())
        ]
        nearest = sorted(sims, key=lambda s: (-s[0], s[1]))[:k]
        scores = [0.0] * num_classes
        for sim, i in nearest:
            scores[int(labels[i])] += math.exp(sim / t)
        best = max(range(num_classes), key=lambda c: (scores[c], -c))
        result.append((best, scores))
    return result


def test_knn_predict_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(40, 5, generator=g), dim=1)
    labels = torch.randint(0, 4, (40,), generator=g)
    queries = F.normalize(torch.randn(12, 5, generator=g), dim=1)
    expected = brute_force_knn(queries, bank, labels, 4, k=7, t=0.1)

    ranked = knn.knn_predict(queries, bank, labels, 4, k=7, t=0.1)
    assert ranked[:, 0].tolist() == [best for best, _ in expected]
    sims, index = knn.knn_topk(queries, bank, 7)
    scores = knn.knn_vote(sims, labels[index], 4, 0.1)
    torch.testing.assert_close(
        scores, torch.tensor([s for _, s in expected]), rtol=1e-5, atol=0
    )


def test_bank_queried_with_its_own_samples_is_always_right():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (50,), generator=g)
    assert torch.equal(knn.knn_predict(bank, bank, labels, 5, k=1, t=0.1)[:, 0], labels)


def test_chunked_knn_equals_unchunked():
    g = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(140, 6, generator=g), dim=1)
    labels = torch.randint(0, 7, (140,), generator=g)
    queries = torch.cat(
        [bank[:10], F.normalize(torch.randn(25, 6, generator=g), dim=1)]
    )

    whole = knn.knn_topk(queries, bank, 9)
    ranked = knn.knn_predict(queries, bank, labels, 7, k=9, t=0.1)
    for bank_chunk in (1, 5, 13, 64):
        part = knn.knn_topk(queries, bank, 9, bank_chunk=bank_chunk)
        assert torch.equal(part[1], whole[1])
        torch.testing.assert_close(part[0], whole[0])  # matmul shapes differ: rounding
        chunked = knn.knn_predict(
            queries, bank, labels, 7, 9, 0.1, query_chunk=4, bank_chunk=bank_chunk
        )
        assert torch.equal(chunked, ranked)


def test_chunked_top_k_breaks_exact_ties_by_bank_index():
    # small integers: every dot product is exact, so ties are exact in any chunking
    g = torch.Generator().manual_seed(3)
    bank = torch.randint(-1, 2, (90, 4), generator=g).float()
    queries = torch.randint(-1, 2, (15, 4), generator=g).float()
    expected = [
        sorted(
            ((float(q @ b), i) for i, b in enumerate(bank)), key=lambda s: (-s[0], s[1])
        )[:11]
        for q in queries
    ]
    for bank_chunk in (None, 1, 7, 30):
        sims, index = knn.knn_topk(queries, bank, 11, bank_chunk=bank_chunk)
        assert index.tolist() == [[i for _, i in row] for row in expected]
        assert sims.tolist() == [[s for s, _ in row] for row in expected]


def test_ties_go_to_the_lower_bank_index_and_class():
    bank = F.normalize(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), dim=1
    )
    query = torch.tensor([[1.0, 0.0]])
    for chunk in (1, 2, 4):
        assert knn.knn_topk(query, bank, 2, bank_chunk=chunk)[1].tolist() == [[0, 2]]
    # rows 0 and 2 tie with classes 1 and 0: equal scores, the lower class wins
    labels = torch.tensor([1, 2, 0, 2])
    assert knn.knn_predict(query, bank, labels, 3, k=2, t=0.1)[0].tolist() == [0, 1, 2]


def test_extracted_features_are_normalised_backbone_outputs():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", num_classes=16, small_stem=True)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])

    got = extract(
        backbone(encoder),
        TensorDataset(images, labels),
        DistEnv(),
        4,
        0,
        normalize=True,
    )
    features, got_labels = got.x, got.y
    # the original is untouched
    assert isinstance(encoder.fc, nn.Linear) and encoder.training
    reference = build_encoder("resnet18", num_classes=16, small_stem=True)
    reference.load_state_dict(encoder.state_dict())
    reference.fc = nn.Identity()
    with torch.no_grad():
        expected = F.normalize(reference.eval()(images), dim=1)
    assert features.shape == (6, 512)  # before the 16-d head
    torch.testing.assert_close(features, expected)
    assert torch.equal(got_labels, labels)


def test_check_knn_data_refuses_missing_or_different_val(tmp_path):
    data = make_image_folder(
        tmp_path / "d", classes=2, per_class=1, size=8, splits=("train",)
    )
    with pytest.raises(UsageError, match="needs .*val"):
        knn.check_knn_data(data)
    make_image_folder(tmp_path / "d", classes=3, per_class=1, size=8, splits=("val",))
    with pytest.raises(UsageError, match="differ.*class2"):
        knn.check_knn_data(data)


def knn_args(data, *extra):
    return main_knn.get_args_parser().parse_args(
        [
            "-a",
            "resnet18",
            "--small-stem",
            "--input-size",
            "16",
            "-b",
            "4",
            "-j",
            "0",
            "--knn-k",
            "3",
            *extra,
            data,
        ]
    )


def test_one_and_two_processes_give_the_same_knn_accuracy(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 processes on 2 cores
    # 3 x 3 images: shares of 4 and 5, which padding to equal shares would break
    data = make_image_folder(tmp_path / "d", classes=3, per_class=3, size=16)
    one = main_knn.main(knn_args(data, "--seed", "5"))
    capfd.readouterr()
    main_knn.main(
        knn_args(
            data,
            "--seed",
            "5",
            "--multiprocessing-distributed",
            "--procs-per-node",
            "2",
            "--world-size",
            "1",
            "--rank",
            "0",
            "--dist-url",
            f"tcp://127.0.0.1:{free_port()}",
        )
    )
    out = capfd.readouterr().out
    two = [float(x) for x in re.findall(r" \* kNN Acc@1 ([\d.]+)", out)]
    assert two == [round(one, 2)]
    assert "9 bank and 9 query images" in out


def test_knn_monitor_in_pretraining_equals_knn_of_the_checkpoint(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", classes=3, per_class=4, size=32)
    out = tmp_path / "out"
    main_moco.main(
        main_moco.get_args_parser().parse_args(
            [
                "-a",
                "resnet18",
                "--small-stem",
                "--input-size",
                "32",
                "-b",
                "8",
                "--moco-k",
                "64",
                "--epochs",
                "1",
                "-j",
                "0",
                "--seed",
                "0",
                "--knn-freq",
                "1",
                "--knn-k",
                "5",
                "--output-dir",
                str(out),
                data,
            ]
        )
    )
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    monitor = [r["knn_acc1"] for r in records if r["kind"] == "knn"]
    assert len(monitor) == 1 and 0 <= monitor[0] <= 100

    # the same encoder read back from the epoch's checkpoint, through the command line
    acc = main_knn.main(
        main_knn.get_args_parser().parse_args(
            [
                "-a",
                "resnet18",
                "--small-stem",
                "--input-size",
                "32",
                "-b",
                "8",
                "-j",
                "0",
                "--knn-k",
                "5",
                "--pretrained",
                str(out / "checkpoint_0000.pth.tar"),
                data,
            ]
        )
    )
    assert acc == monitor[0]
    assert f" * kNN Acc@1 {acc:.2f}" in capsys.readouterr().out


def test_knn_command_refuses_a_wrong_checkpoint_before_reading_data(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(build_encoder("resnet34").state_dict(), path)
    with pytest.raises(UsageError, match="does not hold a resnet18 backbone"):
        main_knn.main(knn_args(str(tmp_path / "no-data"), "--pretrained", str(path)))


def brute_force_accuracy(model, data, transform, k, t):
    """kNN top-1 (%) computed here: features one image at a time, Python loops."""
    from moco.data import SeededImageFolder

    def features(split):
        ds = SeededImageFolder(f"{data}/{split}", transform)
        with torch.no_grad():
            rows = [
                F.normalize(model(ds[i][0][None]), dim=1)[0] for i in range(len(ds))
            ]
        return torch.stack(rows), torch.tensor(ds.targets)

    bank, labels = features("train")
    queries, truth = features("val")
    found = brute_force_knn(queries, bank, labels, len(set(labels.tolist())), k, t)
    return (
        100.0
        * sum(int(p == y) for (p, _), y in zip(found, truth.tolist()))
        / len(truth)
    )


@pytest.mark.parametrize("features", ["backbone", "head"])
def test_knn_on_head_or_backbone_features_equals_brute_force(tmp_path, features):
    from moco.distributed import DistEnv
    from moco.loader import eval_transforms

    # 20-px images evaluated at their own size (--knn-crop none)
    data = make_image_folder(tmp_path / "d", classes=3, per_class=5, size=20)
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", num_classes=8, small_stem=True)
    options = knn.KnnOptions(k=4, features=features, crop="none", input_size=20)
    acc = knn.knn_accuracy(encoder, data, DistEnv(), options, batch_size=4, workers=0)

    model = knn.feature_extractor(encoder, features)
    transform = eval_transforms(20, "imagenet", center_crop=False)[1]
    assert acc == pytest.approx(brute_force_accuracy(model, data, transform, 4, 0.1))
    # the head's 8-d output or the backbone's 512-d features
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        assert model(x).shape == ((2, 8) if features == "head" else (2, 512))
        if features == "head":
            torch.testing.assert_close(model(x), encoder.eval()(x))


def test_small_images_keep_their_size_without_the_centre_crop():
    from PIL import Image

    from moco.loader import eval_transforms

    img = Image.new("RGB", (32, 32), (10, 200, 30))
    assert eval_transforms(32, "cifar10", center_crop=False)[1](img).shape == (
        3,
        32,
        32,
    )
    # the ImageNet evaluation enlarges 32 px to 37 and crops the centre back to 32
    center = eval_transforms(32, "cifar10")[1].transforms
    assert [type(t).__name__ for t in center[:2]] == ["Resize", "CenterCrop"]
    assert center[0].size == 37


def small_moco(mlp):
    """A seeded MoCo on a small-stem ResNet-18 with a 16-d head (v2's MLP with mlp)."""
    from moco.builder import MoCo

    torch.manual_seed(0)
    return MoCo(
        lambda num_classes: build_encoder("resnet18", num_classes, small_stem=True),
        dim=16,
        K=32,
        mlp=mlp,
    )


def save_moco(model, path, **extra):
    """The model as main_moco.py saves it: state_dict keys with the `module.` prefix."""
    from moco import checkpoint as ckpt

    state = {"state_dict": ckpt.with_module_prefix(model.state_dict()), **extra}
    torch.save(state, path)


@pytest.mark.parametrize("mlp", [False, True])
def test_head_features_of_a_checkpoint_are_the_query_encoders_output(tmp_path, mlp):
    model = small_moco(mlp)
    path = tmp_path / "moco.pth.tar"
    save_moco(model, path, arch="resnet18")
    loaded = load_encoder_with_head(str(path), "resnet18", small_stem=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.encoder_q.eval()(x))


def test_head_features_without_a_checkpoint_are_refused(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2, per_class=2, size=8)
    with pytest.raises(UsageError, match="--knn-features head needs --pretrained"):
        main_knn.main(knn_args(data, "--knn-features", "head"))


def test_images_as_they_are_must_be_the_input_size(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2, per_class=2, size=20)
    with pytest.raises(UsageError, match=r"is 20x20, not 32x32 .*--knn-crop center"):
        main_knn.main(knn_args(data, "--knn-crop", "none", "--input-size", "32"))
    assert knn.check_knn_data(data, size=20) == 4


def test_a_head_that_is_not_moco_v1_or_v2_is_refused_in_one_line(tmp_path):
    model = small_moco(mlp=True)
    # a MoCo v3 head: linear, BatchNorm, ReLU, linear
    fc = model.encoder_q.fc
    model.encoder_q.fc = nn.Sequential(fc[0], nn.BatchNorm1d(512), fc[1], fc[2])
    path = tmp_path / "v3.pth.tar"
    save_moco(model, path)
    with pytest.raises(UsageError, match="holds no MoCo v1/v2 head"):
        load_encoder_with_head(str(path), "resnet18", small_stem=True)
