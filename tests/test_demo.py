import os

import numpy as np
import pytest

from moco.data import check_image_folder, check_val_folder
from moco.utils import UsageError
from tools import demo, shapes


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


def test_demo_refuses_a_folder_it_did_not_make_and_leaves_it_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not made by the demo"):
        demo.run_demo(str(tmp_path), demo.QUICK)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_demo_rerun_replaces_only_its_own_previous_run(tmp_path):
    demo.prepare_output_dir(str(tmp_path))
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "log.jsonl").write_text("old run\n")
    (tmp_path / "mine.txt").write_text("keep me")
    demo.prepare_output_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [demo.MARKER, "mine.txt"]


def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = str(tmp_path / "demo")
    results, plot = demo.run_demo(out, demo.QUICK, seed=0)
    assert set(results) == {
        (e, p) for e in ("random", "moco") for p in ("knn", "linear")
    }
    assert all(0.0 <= v <= 100.0 for v in results.values())
    assert os.path.isfile(os.path.join(out, "pretrain", "checkpoint_0000.pth.tar"))
    assert os.path.isfile(os.path.join(out, "linear-moco", "model_best.pth.tar"))
    printed = capsys.readouterr().out
    assert "random init" in printed and "MoCo v2" in printed and "kNN acc@1" in printed
    # each step's command is printed in a form that runs
    assert "$ python main_knn.py " in printed and "$ python main_moco.py " in printed
    assert "$ python main_lincls.py " in printed
    for v in results.values():  # the table shows the figures of this run
        assert f"{v:.1f}" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot is None and "pip install matplotlib" in printed
    else:
        assert plot == os.path.join(out, "curves.png") and os.path.isfile(plot)
