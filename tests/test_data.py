"""
Pretraining images without labels (folders at any depth, list files), the refusal of
unlabelled data where labels are needed, and the queue-holds-the-positive warning.
"""

import os
import random
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from moco.data import (
    NO_LABEL,
    OWN_KEY_LIMIT,
    BadImageError,
    EpochSampler,
    SeededImageFolder,
    find_images,
    load_image,
    own_key_fraction,
    pretrain_images,
    queue_warning,
    require_labels,
)
from moco.loader import pretrain_transform
from moco.utils import UsageError, setup_logging
from tests.conftest import make_image_folder


def image(path, size=12, seed=0):
    """A small random JPEG (or PNG, by the name) at path; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def tree(root, names):
    """Images at root/name for each name; other files are written as text."""
    for i, name in enumerate(names):
        path = os.path.join(root, name)
        if name.lower().endswith((".jpg", ".png")):
            image(path, seed=i)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").write("not an image")
    return str(root)


def test_flat_unlabelled_folder_gives_its_images_in_sorted_order(tmp_path):
    tree(tmp_path / "train", ["b.jpg", "10.jpg", "2.PNG", "notes.txt", "a.jpg"])
    images = pretrain_images(str(tmp_path))
    train = str(tmp_path / "train")
    names = ["10.jpg", "2.PNG", "a.jpg", "b.jpg"]
    assert images.paths == [os.path.join(train, n) for n in names]
    assert images.layout == f"training on the 4 images under {train}"
    assert images.lines is None


def test_nested_folders_give_imagefolders_samples_in_its_order(tmp_path):
    # names whose sorted paths and sorted names disagree ('-' sorts before '/')
    names = [
        "a/z.jpg",
        "a/sub/w.jpg",
        "a/sub/deeper/u.jpg",
        "a/sub-2/v.jpg",
        "a-b/y.jpg",
        "B/x.JPG",
        "b/2020/01/t.png",
        "b/2020/01/readme.txt",
    ]
    root = tree(tmp_path / "train", names)
    os.symlink(tmp_path / "train" / "a" / "sub", tmp_path / "train" / "b" / "link")
    expected = [path for path, _ in ImageFolder(root).samples]
    assert len(expected) == 9  # and a/sub's two images again, through the link
    assert find_images(root) == expected
    assert pretrain_images(str(tmp_path)).paths == expected

    # images beside the class folders are pretraining images too, first
    image(tmp_path / "train" / "loose.jpg")
    assert find_images(root) == [os.path.join(root, "loose.jpg"), *expected]


def test_a_link_back_to_a_parent_folder_is_not_followed_again(tmp_path):
    root = tree(tmp_path / "train", ["top.jpg", "a/x.jpg", "a/b/y.jpg", "c/z.jpg"])
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "a" / "b" / "loop")
    os.symlink(tmp_path / "train", tmp_path / "train" / "a" / "b" / "to-root")
    assert find_images(root) == [
        os.path.join(root, "top.jpg"),
        os.path.join(root, "a", "x.jpg"),
        os.path.join(root, "a", "b", "y.jpg"),
        os.path.join(root, "c", "z.jpg"),
    ]


def test_finding_images_opens_none_of_them(tmp_path, monkeypatch):
    tree(tmp_path / "train", ["c/1.jpg", "c/2.jpg"])

    def fail(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", fail)
    assert len(pretrain_images(str(tmp_path)).paths) == 2


def test_a_folder_without_train_that_holds_images_is_the_training_set(tmp_path):
    tree(tmp_path, ["x/1.jpg", "2.jpg"])
    images = pretrain_images(str(tmp_path))
    assert images.paths == [str(tmp_path / "2.jpg"), str(tmp_path / "x" / "1.jpg")]
    train = os.path.join(str(tmp_path), "train")
    assert images.layout == f"no {train}: training on the 2 images under {tmp_path}"


def test_a_val_folder_without_train_is_refused_not_trained_on(tmp_path):
    tree(tmp_path, ["val/c/1.jpg"])
    with pytest.raises(UsageError, match="has a val folder but no train folder"):
        pretrain_images(str(tmp_path))


def test_empty_or_missing_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist; expected DIR/train"):
        pretrain_images(str(tmp_path / "missing"))
    tree(tmp_path, ["notes.txt"])
    with pytest.raises(UsageError, match="no images under .* expected DIR/train"):
        pretrain_images(str(tmp_path))
    tree(tmp_path / "train", ["empty/notes.txt"])
    with pytest.raises(UsageError, match="'.*train' holds no images .*--train-list"):
        pretrain_images(str(tmp_path))


def write_list(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_a_list_file_keeps_its_order_and_skips_blanks_and_comments(tmp_path):
    data = tmp_path / "data"
    outside = image(tmp_path / "elsewhere" / "abs.jpg")
    tree(data, ["b/2.jpg", "a/1.jpg", "train/c/3.jpg"])
    listed = write_list(
        tmp_path / "list.txt",
        ["# my images", "b/2.jpg", "", outside, "   # indented comment", " a/1.jpg "],
    )
    images = pretrain_images(str(data), listed)
    assert images.paths == [
        str(data / "b" / "2.jpg"),
        outside,
        str(data / "a" / "1.jpg"),
    ]
    assert images.lines == [2, 4, 6]
    assert images.layout == f"training on the 3 images listed in {listed}"

    ds = images.dataset(lambda path: path, decode=False)
    assert len(ds) == 3 and ds[1] == (outside, NO_LABEL)


def test_a_list_files_missing_entry_is_an_error_naming_its_line(tmp_path):
    tree(tmp_path, ["ok.jpg"])
    listed = write_list(
        tmp_path / "list.txt", ["ok.jpg", "# x", "gone.jpg", "gone2.jpg"]
    )
    with pytest.raises(UsageError) as e:
        pretrain_images(str(tmp_path), listed)
    message = str(e.value)
    assert f"{listed} line 3: " in message and "gone.jpg" in message
    assert "(and 1 more lines)" in message and "\n" not in message


def test_a_missing_or_empty_list_file_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="--train-list .* does not exist"):
        pretrain_images(str(tmp_path), str(tmp_path / "list.txt"))
    listed = write_list(tmp_path / "list.txt", ["# nothing", ""])
    with pytest.raises(UsageError, match="lists no images"):
        pretrain_images(str(tmp_path), listed)


def test_an_unreadable_listed_image_names_its_line_or_is_skipped(tmp_path, capsys):
    tree(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    listed = write_list(tmp_path / "list.txt", ["a.jpg", "", "bad.jpg", "b.jpg"])
    images = pretrain_images(str(tmp_path), listed)
    to_size = lambda img: img.size  # noqa: E731

    with pytest.raises(BadImageError, match=f"^{listed} line 3: cannot read image"):
        images.dataset(to_size)[1]

    setup_logging()
    ds = images.dataset(to_size, skip_bad=True)
    assert ds[1] == ((12, 12), NO_LABEL)  # b.jpg, the next readable one
    assert int(ds.skipped) == 1
    assert f"skipping: {listed} line 3: cannot read image" in capsys.readouterr().out


def test_an_imagefolder_gives_todays_samples_and_seeded_draws(image_folder):
    train = os.path.join(image_folder, "train")
    transform = pretrain_transform("v2", 16, "original")
    folder = SeededImageFolder(train, transform, data_seed=3)
    images = pretrain_images(image_folder)
    assert images.paths == [path for path, _ in ImageFolder(train).samples]
    ds = images.dataset(transform, data_seed=3)
    assert [p for p, _ in ds.samples] == [p for p, _ in folder.samples]

    sampler = EpochSampler(folder, data_seed=3)
    sampler.set_epoch(2)
    for key in list(sampler)[:6] + [5]:  # (index, seed) pairs and a plain index
        (q, k), target = ds[key]
        (q_folder, k_folder), target_folder = folder[key]
        assert torch.equal(q, q_folder) and torch.equal(k, k_folder), key
        index = key[0] if isinstance(key, tuple) else key
        assert target == NO_LABEL and target_folder == folder.targets[index]

    # today's draw, written out: the transform under torch's and Python's random
    # states seeded by the key
    index, seed = list(sampler)[0]
    torch.manual_seed(seed)
    random.seed(seed)
    q_today, _ = transform(load_image(folder.samples[index][0]))
    assert torch.equal(ds[(index, seed)][0][0], q_today)


def test_labels_are_required_where_they_are_used(tmp_path, image_folder):
    what = "the kNN monitor (--knn-freq)"
    flat = tree(tmp_path / "flat", ["train/1.jpg", "val/c/2.jpg"])
    with pytest.raises(UsageError) as e:
        require_labels(flat, what)
    message = str(e.value)
    assert message.startswith(f"{what} needs labelled images, but ")
    train = os.path.join(flat, "train")
    assert f"the training data folder {train!r} has no class folders" in message
    assert f"{flat}/train/<class>/<image> and {flat}/val/<class>/<image>" in message

    no_val = make_image_folder(tmp_path / "no_val", 2, 2, 8, splits=("train",))
    with pytest.raises(UsageError, match=r"validation data folder .*val' does not exi"):
        require_labels(no_val, "main_lincls.py")

    assert require_labels(image_folder, what) == (
        ["class0", "class1", "class2"],
        24,
        24,
    )


def test_no_queue_warning_for_the_published_recipes():
    assert queue_warning(4096, 50000) is None  # the official CIFAR-10 demo
    assert queue_warning(65536, 1281167) is None  # MoCo on ImageNet-1k


def test_queue_warning_fires_past_the_limit_and_names_a_smaller_queue():
    n = 10000
    limit = int((2 * OWN_KEY_LIMIT) ** 0.5 * n)  # 1414 keys for 10,000 images
    assert queue_warning(limit, n) is None
    line = queue_warning(limit + 1, n)
    assert line.startswith(f"--moco-k {limit + 1} with {n} training images")
    assert "--moco-k 1024 or smaller" in line and "\n" not in line

    line = queue_warning(65536, 1000)  # the default queue on a small set
    assert "the queue holds 66 epochs' worth of keys" in line
    assert "100.0% of the queries" in line and "--moco-k 128 or smaller" in line

    # with --symmetric each image puts two keys in the queue: it spans half the epochs
    assert queue_warning(2 * limit, n, keys_per_image=2) is None
    assert "--moco-k 2048 or smaller" in queue_warning(2 * limit + 2, n, 2)

    # a queue under the limit that cannot hold a batch: the batch must shrink too
    assert "global batch" not in queue_warning(65536, 1000, keys_per_step=128)
    line = queue_warning(65536, 1000, keys_per_step=256)
    assert "--moco-k 128 or smaller and a global batch of at most 128 " in line
    line = queue_warning(65536, 1000, keys_per_image=2, keys_per_step=512)
    assert "--moco-k 256 or smaller and a global batch of at most 128 " in line


@pytest.mark.parametrize("ratio", [0.5, 1.5, 2.5])
def test_own_key_fraction_matches_a_queue_over_shuffled_epochs(ratio):
    # the sampler's per-epoch shuffle, a FIFO queue of the last K keys, batch 4
    n, batch, epochs = 400, 4, 40
    k = int(ratio * n)
    sampler = EpochSampler(list(range(n)))
    queue, hits, queries = deque(maxlen=k), 0, 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = [index for index, _ in sampler]
        for start in range(0, n, batch):
            step = order[start : start + batch]
            if epoch >= 3:  # the queue holds real keys of every age
                hits += sum(index in queue for index in step)
                queries += len(step)
            queue.extend(step)  # enqueued after the logits
    measured = hits / queries
    assert abs(measured - own_key_fraction(k, n)) < 0.02, measured
