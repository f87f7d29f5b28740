import os
import shutil
import tarfile
from dataclasses import replace

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from moco.data import check_image_folder, check_val_folder
from moco.utils import UsageError, setup_logging
from tools import demo, shapes
from tools.cifar10 import find_cifar10


def read_tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_shapes_are_the_same_bytes_for_a_seed_and_differ_for_another(tmp_path):
    kwargs = dict(train_per_class=2, val_per_class=1, size=16)
    a = read_tree(shapes.make_shapes(str(tmp_path / "a"), seed=3, **kwargs))
    b = read_tree(shapes.make_shapes(str(tmp_path / "b"), seed=3, **kwargs))
    c = read_tree(shapes.make_shapes(str(tmp_path / "c"), seed=4, **kwargs))
    assert len(a) == 3 * len(shapes.CLASSES)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_each_image_has_its_own_seed_so_growing_a_split_keeps_its_images(tmp_path):
    small = read_tree(shapes.make_shapes(str(tmp_path / "s"), 2, 1, size=16, seed=0))
    large = read_tree(shapes.make_shapes(str(tmp_path / "l"), 3, 2, size=16, seed=0))
    assert all(large[k] == v for k, v in small.items())
    # the splits are drawn from different seeds: no validation image is a training one
    train = {v for k, v in large.items() if k.startswith("train")}
    assert not train & {v for k, v in large.items() if k.startswith("val")}


def test_drawn_image_varies_everything_but_the_class():
    images = [
        shapes.draw_shape("star", 32, shapes.image_rng(0, "train", 0, i))
        for i in range(6)
    ]
    for img in images:
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert len({img.tobytes() for img in images}) == 6
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.draw_shape("blob", 16, shapes.image_rng(0, "train", 0, 0))


def test_dataset_is_an_image_folder_with_the_same_classes_in_both_splits(tmp_path):
    root = shapes.make_shapes(str(tmp_path / "d"), 2, 1, size=16)
    classes, n = check_image_folder(os.path.join(root, "train"))
    assert classes == sorted(shapes.CLASSES) and n == 2 * len(shapes.CLASSES)
    assert check_val_folder(root) == len(shapes.CLASSES)


def demo_args(out, *extra):
    return demo.get_args_parser().parse_args(["--output-dir", str(out), *extra])


def test_demo_refuses_a_folder_it_did_not_make_and_leaves_it_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not made by the demo"):
        demo.run_demo(demo_args(tmp_path, "--shapes"), demo.QUICK)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_demo_rerun_replaces_only_its_own_previous_run(tmp_path):
    demo.prepare_output_dir(str(tmp_path))
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "log.jsonl").write_text("old run\n")
    (tmp_path / "mine.txt").write_text("keep me")
    demo.prepare_output_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [demo.MARKER, "mine.txt"]


def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    results, plot = demo.run_demo(demo_args(out, "--shapes"), demo.QUICK)
    assert {e: set(r) for e, r in results.items()} == {
        e: {"knn", "linear"} for e in ("random", "moco")
    }
    assert all(0.0 <= v <= 100.0 for r in results.values() for v in r.values())
    assert os.path.isfile(out / "pretrain" / "checkpoint_0000.pth.tar")
    assert os.path.isfile(out / "linear-moco" / "model_best.pth.tar")
    # the speed measurement leaves its log, not its checkpoint
    assert sorted(os.listdir(out / "speed")) == ["data", "log.jsonl"]
    printed = capsys.readouterr().out
    assert "random init" in printed and "MoCo" in printed and "kNN acc@1" in printed
    assert "the generated shapes dataset instead" in printed
    # the pretraining is sized to the speed measured, and says so
    assert "=> pretraining speed " in printed and "left for pretraining" in printed
    assert "MoCo: pretrained on 64 images, 1 epoch(s), 4 steps of 16" in printed
    assert "contrastive loss: " in printed and "ln(K+1) = 4.17 at chance" in printed
    # each step's command is printed in a form that runs
    assert "$ python main_moco.py " in printed
    assert (
        "$ python main_lincls.py " in printed and " --cached-features --knn " in printed
    )
    for r in results.values():  # the table shows the figures of this run
        assert all(f"{v:.1f}" in printed for v in r.values())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot is None and "pip install matplotlib" in printed
    else:
        assert plot == os.path.join(out, "curves.png") and os.path.isfile(plot)


def test_the_loss_line_compares_the_end_with_chance_and_the_quarter_before():
    falling = demo.loss_summary([6.0, 6.5, 6.0, 5.8, 5.6, 5.5, 5.2, 5.0], 1024)
    assert falling.startswith("contrastive loss: 6.00 at the first logged step, 5.10")
    assert "ln(K+1) = 6.93 at chance; falling at the end" in falling
    assert "quarter's before it, 5.55)" in falling
    rising = demo.loss_summary([1.0, 5.0, 5.2, 5.4, 5.5, 5.6], 1024)
    assert "not falling at the end" in rising
    assert "1 step(s) logged" in demo.loss_summary([3.0], 64)


def test_the_pretraining_plan_fits_the_time_left():
    plan = demo.plan_pretraining
    # 10 images/s for 300 s: one epoch over 3000 images
    assert plan(10.0, 300, 10, 5000, 128, 20) == (300, 1)
    # all 50000 images fit 6 times: 6 epochs over all of them; at most max_epochs
    assert plan(1000.0, 300, 10, 5000, 128, 20) == (5000, 6)
    assert plan(1e6, 300, 10, 5000, 128, 20) == (5000, 20)
    # no time left: still one full batch (13 of each of 10 classes for 128)
    assert plan(10.0, -5, 10, 5000, 128, 20) == (13, 1)


def test_demo_refuses_bad_sizes_in_one_line(tmp_path):
    for argv, message in (
        (["--budget", "0"], "--budget must be positive"),
        (["--epochs", "-1"], "--epochs must be positive"),
        (["-j", "-1"], "-j/--workers must be zero or positive"),
    ):
        with pytest.raises(UsageError, match=message):
            demo.main(demo_args(tmp_path / "out", *argv))
    assert not os.path.exists(tmp_path / "out")


# --- where the demo finds CIFAR-10 ------------------------------------------------------


def tiny_cifar(root, per_class=2):
    """An ImageFolder with train/ and val/ of two classes, as CIFAR-10's JPEG tarball."""
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            os.makedirs(root / split / c)
            for i in range(per_class):
                img = np.full((32, 32, 3), 40 * i + (c == "dog") * 100, np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i:04d}.jpg")
    return root


def make_tarball(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    return str(path)


def test_data_is_found_in_order_folder_tarball_cache_then_none(tmp_path):
    folder = tiny_cifar(tmp_path / "cifar10")
    tarball = make_tarball(folder, tmp_path / "cifar10-jpeg.tar.gz")
    cache = str(tmp_path / "cache")

    # an ImageFolder, or the folder that holds it
    assert find_cifar10(str(folder), cache)[0] == str(folder)
    assert find_cifar10(str(tmp_path), cache, False)[0] == str(folder)
    # a tarball: unpacked into the cache once
    root, how = find_cifar10(tarball, cache)
    assert root == os.path.join(cache, "unpacked", "cifar10-jpeg", "cifar10")
    assert how == f"--data {tarball}" and sorted(os.listdir(root)) == ["train", "val"]
    stamp = os.stat(os.path.join(root, "train", "cat", "0000.jpg")).st_mtime_ns
    # no --data: the cached copy, else nothing (downloads are off in tests)
    assert find_cifar10(None, cache, allow_download=False)[0] is None
    shutil.copytree(folder, os.path.join(cache, "cifar10"))
    open(os.path.join(cache, "cifar10", ".complete"), "w").close()
    root, how = find_cifar10(None, cache, allow_download=False)
    assert root == os.path.join(cache, "cifar10") and how.startswith("the cached copy")
    # the unpacked tarball was not unpacked again
    unpacked = os.path.join(cache, "unpacked", "cifar10-jpeg", "cifar10")
    assert (
        os.stat(os.path.join(unpacked, "train", "cat", "0000.jpg")).st_mtime_ns == stamp
    )


def test_bad_data_is_refused_in_one_line(tmp_path):
    cache = str(tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no train/ and val/"):
        find_cifar10(str(tmp_path / "empty"), cache)
    with pytest.raises(UsageError, match="neither a folder nor"):
        find_cifar10(str(tmp_path / "missing"), cache)
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UsageError, match="cannot be unpacked"):
        find_cifar10(str(tmp_path / "broken.tar.gz"), cache)


def test_demo_takes_a_class_balanced_subset_of_cifar(tmp_path, capsys):
    setup_logging()
    folder = tiny_cifar(tmp_path / "cifar10", per_class=3)
    args = demo_args(
        tmp_path / "out", "--data", str(folder), "--cache-dir", str(tmp_path)
    )
    config = replace(demo.QUICK, train_per_class=2, val_per_class=1)
    name, classes, pool = demo.prepare_data(args, config, str(tmp_path / "d"))
    assert (name, classes) == ("CIFAR-10", ["cat", "dog"])
    # pretraining may take from all of CIFAR-10's training images
    assert pool == os.path.join(folder, "train")
    for split, n in (("train", 2), ("val", 1)):
        for c in classes:
            files = sorted(os.listdir(tmp_path / "d" / split / c))
            assert files == [f"{i:04d}.jpg" for i in range(n)]
    assert "CIFAR-10 from --data" in capsys.readouterr().out


def test_demo_without_cifar_says_so_and_draws_shapes(tmp_path, capsys):
    setup_logging()
    args = demo_args(tmp_path / "out", "--cache-dir", str(tmp_path), "--no-download")
    config = replace(demo.QUICK, train_per_class=1, val_per_class=1)
    name, classes, pool = demo.prepare_data(args, config, str(tmp_path / "d"))
    assert name == "shapes" and classes == list(shapes.CLASSES)
    assert pool == str(tmp_path / "d" / "train")
    out = capsys.readouterr().out
    assert "CIFAR-10 not used (no --data and no cached copy in" in out


SHARED = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.gz")


@pytest.mark.skipif(
    not os.path.isfile(SHARED), reason=f"no CIFAR-10 tarball at {SHARED}"
)
def test_the_shared_cifar10_tarball_holds_the_image_folder_the_demo_reads():
    # its members, streamed: what unpack() (tested above on a small tarball) writes
    # and image_folder_root() then finds, without writing 60,000 files
    files, first = {}, {}
    with tarfile.open(SHARED, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile():
                assert len(parts) == 4 and parts[0] == "cifar10", member.name
                key = (parts[1], parts[2])
                files[key] = files.get(key, 0) + 1
                if key not in first:  # one image of each class and split decodes
                    with tar.extractfile(member) as f:
                        first[key] = Image.open(f).convert("RGB").size
    classes = sorted({c for _, c in files})
    assert len(classes) == 10 and "airplane" in classes
    assert {s for s, _ in files} == {"train", "val"}
    for c in classes:
        assert (files[("train", c)], files[("val", c)]) == (5000, 1000), c
    assert set(first.values()) == {(32, 32)}
