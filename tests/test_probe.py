"""The quick linear probe (main_lincls.py --cached-features) against brute force."""

import json
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from conftest import free_port, make_image_folder
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import TensorDataset
from torchvision.datasets import ImageFolder

import main_knn
import main_lincls
from moco import probe
from moco.distributed import DistEnv
from moco.features import Features, extract
from moco.loader import eval_transforms
from moco.meters import JsonLogger
from moco.models import build_encoder
from moco.utils import UsageError, adjust_learning_rate

SIZE = 16
SMALL = ["-a", "resnet18", "--small-stem", "--input-size", str(SIZE), "-j", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """15 + 15 images of 3 classes and an encoder file whose BatchNorm saw data."""
    root = tmp_path_factory.mktemp("probe")
    data = make_image_folder(root / "data", classes=3, per_class=5, size=20)
    torch.manual_seed(1)
    encoder = build_encoder("resnet18", small_stem=True)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = str(root / "encoder.pth")
    torch.save(encoder.state_dict(), path)  # a torchvision state_dict
    return data, path


def direct_features(path, data, split):
    """The backbone's outputs for every image of DATA/split, all in one batch."""
    model = build_encoder("resnet18", small_stem=True)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.fc = nn.Identity()
    folder = ImageFolder(os.path.join(data, split), eval_transforms(SIZE)[1])
    images = torch.stack([image for image, _ in folder])
    with torch.no_grad():
        return model.eval()(images), torch.tensor(folder.targets)


def probe_args(data, out, *extra):
    return main_lincls.get_args_parser().parse_args(
        [*SMALL, "-b", "4", "--seed", "0", "--output-dir", str(out), *extra, data]
    )


def records(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_cached_features_are_the_backbone_outputs_of_every_image(tiny):
    data, path = tiny
    encoder = build_encoder("resnet18", small_stem=True)
    encoder.load_state_dict(torch.load(path, weights_only=True))
    encoder.train()
    train, val = probe.extract_splits(
        encoder, data, DistEnv(), eval_transforms(SIZE)[1], batch_size=4, workers=0
    )
    for split, got in (("train", train), ("val", val)):
        x, y = direct_features(path, data, split)
        assert got.x.shape == (15, 512)  # raw, before the head, not L2-normalised
        torch.testing.assert_close(got.x, x)
        assert torch.equal(got.y, y)
    # the encoder given is left as it was
    assert isinstance(encoder.fc, nn.Linear) and encoder.training


def plain_sgd(fc, x, y, epochs, batch_size, seed, lr, schedule, weight_decay):
    """SGD of fc over shuffled mini-batches, written out step by step."""
    optimizer = torch.optim.SGD(
        fc.parameters(), lr, momentum=0.9, weight_decay=weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        epoch_lr = lr
        for milestone in schedule:
            epoch_lr *= 0.1 if epoch >= milestone else 1.0
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(fc(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(y))
    return losses


def test_probe_training_is_plain_sgd_over_seeded_batches():
    torch.manual_seed(0)
    x, y = torch.randn(37, 8), torch.randint(0, 4, (37,))
    fc = nn.Linear(8, 4)
    reference = nn.Linear(8, 4)
    reference.load_state_dict(fc.state_dict())

    optimizer = torch.optim.SGD(fc.parameters(), 0.5, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(3)
    losses = []
    for epoch in range(3):
        adjust_learning_rate(optimizer, epoch, 0.5, 3, [2])
        stats = probe.train_epoch(fc, optimizer, Features(x, y), 10, generator)
        losses.append(stats["loss"])
    expected = plain_sgd(reference, x, y, 3, 10, 3, 0.5, [2], 1e-4)
    # the same batches (the last one of 7) and updates: identical weights
    assert torch.equal(fc.weight, reference.weight)
    assert torch.equal(fc.bias, reference.bias)
    assert losses == pytest.approx(expected, rel=1e-6)


def test_standardised_features_and_the_folded_classifier_agree():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * torch.tensor([1, 10, 100, 0.1, 1, 5]) + 3
    x[:, 4] = 2.0  # a feature that never varies
    mean, std = probe.feature_stats(x)
    z = probe.standardize_(x.clone(), mean, std)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    # the variance's small eps aside
    torch.testing.assert_close(
        z[:, [0, 1, 2, 3, 5]].std(0, correction=0), torch.ones(5), rtol=1e-4, atol=0
    )
    assert torch.equal(z[:, 4], torch.zeros(50))
    fc = nn.Linear(6, 3)
    folded = probe.fold(fc, mean, std)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), fc(z), rtol=1e-5, atol=1e-4)


def test_cached_probe_equals_brute_force_and_its_files_evaluate_on_images(
    tiny, tmp_path
):
    data, path = tiny
    epochs, lr = 4, 0.05
    out = tmp_path / "cached"
    extra = ["--cached-features", "--knn", "--epochs", str(epochs), "--lr", str(lr)]
    best = main_lincls.main(
        probe_args(data, out, *extra, "--schedule", "3", "--pretrained", path)
    )

    # brute force: the backbone's outputs, standardised, plain SGD, folded
    x, y = direct_features(path, data, "train")
    x_val, y_val = direct_features(path, data, "val")
    mean, std = x.mean(0), (x.var(0, correction=0) + 1e-6).sqrt()
    args = probe_args(data, out)
    main_lincls.seed_everything(0)
    fc = main_lincls.create_model(args, 3).fc  # the fc main_lincls starts from
    # --seed 0 seeds the shuffle; -b 4: batches of 4, the last of 3
    plain_sgd(fc, (x - mean) / std, y, epochs, 4, 0, lr, [3], 0.0)
    weight = fc.weight.detach() / std
    bias = fc.bias.detach() - weight @ mean

    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert set(state) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer"}
    assert (state["epoch"], state["arch"], state["best_acc1"]) == (
        epochs,
        "resnet18",
        best,
    )
    sd = state["state_dict"]
    torch.testing.assert_close(sd["module.fc.weight"], weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sd["module.fc.bias"], bias, rtol=1e-4, atol=1e-5)
    # the backbone is the file's, BatchNorm statistics included
    encoder = torch.load(path, weights_only=True)
    assert all(
        torch.equal(sd["module." + k], v) for k, v in encoder.items() if "fc" not in k
    )

    epoch_records = records(out, "epoch")
    assert [r["epoch"] for r in epoch_records] == list(range(epochs))
    last = epoch_records[-1]
    expected_acc1 = 100 * (x_val @ weight.T + bias).argmax(1).eq(y_val).sum() / 15
    assert last["val_acc1"] == pytest.approx(float(expected_acc1))
    assert last["val_images"] == 15 and best == max(
        r["val_acc1"] for r in epoch_records
    )
    best_epoch = max(epoch_records, key=lambda r: r["val_acc1"])["epoch"]
    best_file = torch.load(out / "model_best.pth.tar", weights_only=True)
    assert (best_file["epoch"], best_file["best_acc1"]) == (best_epoch + 1, best)

    # the original's --evaluate on images gives the last epoch's figures
    evaluated = main_lincls.main(
        probe_args(
            data, tmp_path / "eval", "-e", "--resume", str(out / "checkpoint.pth.tar")
        )
    )
    assert evaluated == pytest.approx(last["val_acc1"])
    # --knn: main_knn.py's figure for the same file
    knn = main_knn.main(
        main_knn.get_args_parser().parse_args(
            [*SMALL, "-b", "4", "--pretrained", path, data]
        )
    )
    assert records(out, "knn")[0]["knn_acc1"] == knn


class LiveTensorBytes(TorchDispatchMode):
    """
    The bytes of the tensors allocated under it that are still alive (`live`), and
    their maximum (`peak`): each new storage counted once, until it is freed, however
    many views share it; the storages an operation was given are not new.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        given = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size and key not in given and key not in self.tracked:
                self.tracked.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key, size):
        self.tracked.discard(key)
        self.live -= size


def extraction_peak(env, n=2000, dim=256, batch_size=8):
    """
    (peak, features, batch) bytes of extracting `dim`-d features of n tiny images in
    batches of batch_size: features and labels as returned; a batch's images, labels
    and outputs.
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 2, 2, generator=generator)
    dataset = TensorDataset(images, torch.randint(0, 4, (n,), generator=generator))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, dim))
    with LiveTensorBytes() as counter:
        got = extract(model, dataset, env, batch_size, workers=0)
    assert got.x.shape == (n, dim) and got.y.shape == (n,)
    batch = batch_size * (12 * 4 + 8 + dim * 4)
    return counter.peak, n * dim * 4 + n * 8, batch


def test_extraction_peaks_at_the_features_and_a_batch():
    # every process holds all the features (N x D float32) and labels (N int64) and,
    # while it extracts, the batch in hand and the one before: no list of batches
    # beside their concatenation (twice the features)
    peak, features, batch = extraction_peak(DistEnv())
    assert features <= peak <= features + 4 * batch


def test_the_probe_trains_on_the_features_without_copying_them():
    torch.manual_seed(0)
    n, dim = 2000, 256
    train = Features(torch.randn(n, dim) * 3 + 1, torch.randint(0, 4, (n,)))
    val = Features(torch.randn(100, dim), torch.randint(0, 4, (100,)))
    fc = nn.Linear(dim, 4)
    optimizer = torch.optim.SGD(fc.parameters(), 0.1, momentum=0.9)
    with LiveTensorBytes() as counter:
        probe.fit(
            fc,
            optimizer,
            train,
            val,
            DistEnv(),
            epochs=2,
            lr=0.1,
            schedule=[1],
            batch_size=64,
            seed=0,
            print_freq=1,
            log=JsonLogger("unused", enabled=False),
        )
    # standardised in place: what training adds (the shuffled order, N int64, a
    # mini-batch, the classifier and its momentum) is far below the features' size
    assert counter.peak < n * dim * 4 / 10


class HostToDevice(TorchDispatchMode):
    """
    Counts the copies from the host to the device, `blocking` and not (the meta
    device stands in for a GPU: a blocking copy to a GPU waits for it). A copy back
    to the host gives zeros: meta tensors hold no values.
    """

    def __init__(self):
        super().__init__()
        self.blocking = self.non_blocking = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0].device, kwargs.get("device", args[0].device)
            if (source.type, target.type) == ("cpu", "meta"):
                if kwargs.get("non_blocking", False):
                    self.non_blocking += 1
                else:
                    self.blocking += 1
            if (source.type, target.type) == ("meta", "cpu"):
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype"))
        return func(*args, **kwargs)


def test_extraction_copies_the_labels_to_the_device_once():
    dataset = TensorDataset(torch.randn(20, 3, 2, 2), torch.randint(0, 4, (20,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8)).to("meta")
    env = DistEnv(device=torch.device("meta"))
    with HostToDevice() as copies:
        got = extract(model, dataset, env, batch_size=4, workers=0, normalize=True)
    assert got.x.shape == (20, 8) and got.y.device.type == "meta"
    # each of the 5 batches' images without waiting, the labels once at the end
    assert (copies.non_blocking, copies.blocking) == (5, 1)


def test_an_epoch_of_the_probe_copies_its_order_to_the_device_once():
    train = Features(
        torch.randn(50, 8, device="meta"), torch.zeros(50, dtype=torch.long).to("meta")
    )
    fc = nn.Linear(8, 4).to("meta")
    optimizer = torch.optim.SGD(fc.parameters(), 0.1, momentum=0.9)
    with HostToDevice() as copies:
        probe.train_epoch(fc, optimizer, train, 8, torch.Generator().manual_seed(0))
    # the shuffled order of 7 mini-batches, drawn on the host: one copy
    assert copies.blocking == 1


def _two_processes(rank, port, data, path, out):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank
    )
    try:
        env = DistEnv(rank, 2, rank, 2, torch.device("cpu"))
        module = nn.Linear(2, 2)
        nn.init.constant_(module.weight, float(rank))
        probe.share_from_first_process(module)
        encoder = build_encoder("resnet18", small_stem=True)
        encoder.load_state_dict(torch.load(path, weights_only=True))
        # -b 4 over 2 processes: 2 images per forward pass
        train, val = probe.extract_splits(
            encoder, data, env, eval_transforms(SIZE)[1], batch_size=2, workers=0
        )
        args = probe_args(data, out, *PROBE, "--pretrained", path)
        best = main_lincls.run(env, args)
        result = {"shared": module.weight, "train": train, "val": val, "best": best}
        result["peak"] = extraction_peak(env)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


PROBE = ["--cached-features", "--knn", "--epochs", "3", "--lr", "0.01"]


def test_one_and_two_processes_give_the_same_features_and_accuracy(
    tiny, tmp_path, monkeypatch
):
    data, path = tiny
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 processes on 2 cores
    two = tmp_path / "two"
    two.mkdir()
    mp.spawn(_two_processes, args=(free_port(), data, path, str(two)), nprocs=2)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = tmp_path / "one"
    best = main_lincls.main(probe_args(data, one, *PROBE, "--pretrained", path))

    assert torch.equal(ranks[1]["shared"], torch.zeros(2, 2))  # process 0's
    # 15 images in shares of 7 and 8: each process holds all of them, in order
    for split in ("train", "val"):
        x, y = direct_features(path, data, split)
        for r in ranks:
            torch.testing.assert_close(r[split].x, x)
            assert torch.equal(r[split].y, y)
    assert ranks[0]["best"] == ranks[1]["best"] == best
    # the shares gathered into the features' own tensor on each process
    for r in ranks:
        peak, features, batch = r["peak"]
        assert features <= peak <= features + 4 * batch
    assert records(two, "knn") == records(one, "knn")
    for a, b in zip(records(two, "epoch"), records(one, "epoch"), strict=True):
        assert (a["val_acc1"], a["val_acc5"], a["val_images"]) == (
            b["val_acc1"],
            b["val_acc5"],
            15,
        )
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    fc = [
        torch.load(d / "checkpoint.pth.tar", weights_only=True)["state_dict"]
        for d in (one, two)
    ]
    for k in ("module.fc.weight", "module.fc.bias"):
        torch.testing.assert_close(fc[0][k], fc[1][k], rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused_in_one_line(tiny, tmp_path):
    data, path = tiny
    out = tmp_path / "out"
    cases = {
        ("--cached-features", "--resume", path): "takes no --resume",
        ("--cached-features", "-e"): "takes no --evaluate",
        ("--cached-features", "--start-epoch", "2"): "takes no --start-epoch",
        ("--knn",): "--knn measures cached features: add --cached-features",
        ("--cached-features", "--lr", "0"): "--lr must be positive",
        ("--cached-features", "--pretrained", str(tmp_path / "no.pth")): "not exist",
    }
    for argv, message in cases.items():
        with pytest.raises(UsageError, match=message) as e:
            main_lincls.main(probe_args(data, out, *argv))
        assert "\n" not in str(e.value), argv
    assert not os.path.exists(out) or os.listdir(out) == []  # nothing written

    # an unreadable validation image: named, in one line, before any training
    bad = make_image_folder(tmp_path / "bad", classes=3, per_class=2, size=20)
    broken = os.path.join(bad, "val", "class1", "0.jpg")
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(UsageError, match="cannot read image .*0.jpg") as e:
        main_lincls.main(probe_args(bad, tmp_path / "bad-out", "--cached-features"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "bad-out" / "checkpoint.pth.tar")
