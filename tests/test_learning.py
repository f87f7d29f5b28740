"""Training learns: the contrastive loss falls as the key encoder follows the momentum
rule, and the linear classifier (on images and on cached features) fits a separable
set."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from test_original import TinyEncoder

import main_lincls
from main_moco import train_step
from moco.builder import MoCo

N_IMAGES, BATCH, QUEUE, EPOCHS = 48, 8, 16, 10
M, T, NOISE = 0.9, 0.2, 0.6


def instance_loss(model, data, seed):
    """Each image's query against the keys of all N images, one noisy view each: the
    cross-entropy of picking its own key (ln 48 = 3.87 for features that know
    nothing)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        q = F.normalize(
            model.encoder_q(data + NOISE * torch.randn(data.shape, generator=g))
        )
        k = F.normalize(
            model.encoder_k(data + NOISE * torch.randn(data.shape, generator=g))
        )
    model.train()
    return F.cross_entropy(q @ k.T / T, torch.arange(len(data))).item()


def test_pretraining_lowers_the_contrastive_loss_and_moves_keys_by_the_momentum_rule():
    # 48 fixed images, two noisy views of each a step, 6 steps an epoch; the queue
    # holds 2 steps of keys, so an image's own earlier key is never a negative
    torch.manual_seed(0)
    model = MoCo(TinyEncoder, dim=16, K=QUEUE, m=M, T=T)
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(N_IMAGES, 3, 8, 8, generator=g)
    before = instance_loss(model, data, seed=99)

    epoch_losses = []
    for _ in range(EPOCHS):
        losses = []
        for batch in torch.randperm(N_IMAGES, generator=g).view(-1, BATCH):
            x = data[batch]
            q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
            k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
            loss = train_step(
                model,
                nn.CrossEntropyLoss(),
                opt,
                x + NOISE * torch.randn(x.shape, generator=g),
                x + NOISE * torch.randn(x.shape, generator=g),
                scaler=scaler,
                autocast=torch.autocast("cpu", enabled=False),
            )[1]
            losses.append(loss)
            # the key encoder moved to m k + (1 - m) q, q as it was before the step
            for q, k, k_now in zip(q_before, k_before, model.encoder_k.parameters()):
                torch.testing.assert_close(k_now, M * k + (1 - M) * q)
        epoch_losses.append(sum(losses) / len(losses))

    # from the second epoch on the queue holds real keys only (chance: ln 17 = 2.83);
    # the loss first rises as it fills, as in the official demo's run, then falls
    assert epoch_losses[-1] < 0.5 * epoch_losses[1], epoch_losses
    assert instance_loss(model, data, seed=99) < before - 0.5
    # the key encoder lags behind the query encoder
    assert not torch.equal(model.encoder_k.fc.weight, model.encoder_q.fc.weight)


COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Three classes of noisy red, green and blue 32-px images, 8 per class and split:
    a random backbone's features separate them."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(8):
                noise = rng.integers(-30, 30, (32, 32, 3))
                img = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return str(root)


def lincls(data, out, *extra):
    argv = [data, "-a", "resnet18", "--input-size", "32", "-b", "8", "-j", "0"]
    argv += ["-p", "100", "--seed", "0", "--output-dir", str(out), *extra]
    main_lincls.main(main_lincls.get_args_parser().parse_args(argv))
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "epoch"]


@pytest.fixture
def sgd_steps(monkeypatch):
    """The settings of every SGD step taken: lr, momentum, weight decay, parameters."""
    taken = []
    real = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        taken.append(
            [
                (
                    g["lr"],
                    g["momentum"],
                    g["weight_decay"],
                    [p.shape for p in g["params"]],
                )
                for g in self.param_groups
            ]
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return taken


def test_linear_classifier_fits_a_separable_set_with_the_settings_given(
    colours, tmp_path, sgd_steps
):
    epochs = lincls(
        colours,
        tmp_path,
        *("--epochs", "4", "--lr", "0.01", "--schedule", "3"),
        *("--momentum", "0.8", "--wd", "1e-5"),
    )
    loss = [e["loss"] for e in epochs]
    assert loss[-1] < 0.85 * loss[0], loss
    assert epochs[0]["acc1"] < 50 and epochs[-1]["acc1"] == 100.0, epochs
    assert epochs[-1]["val_acc1"] == 100.0, epochs
    # 24 images in batches of 8: 3 steps an epoch, fc alone, the step schedule's
    # rate (x 0.1 from epoch 3 on)
    assert len(sgd_steps) == 12
    for i, groups in enumerate(sgd_steps):
        lr = 0.01 * (0.1 if i // 3 >= 3 else 1.0)
        assert groups == [(pytest.approx(lr), 0.8, 1e-5, [(3, 512), (3,)])], i
    # the original's checkpoint files and keys: the last epoch, and the first to
    # reach the best validation accuracy
    best = 1 + next(e["epoch"] for e in epochs if e["val_acc1"] == 100.0)
    for name, epoch in (("checkpoint.pth.tar", 4), ("model_best.pth.tar", best)):
        state = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert {"epoch", "arch", "state_dict", "best_acc1", "optimizer"} <= set(state)
        assert (state["epoch"], state["arch"], state["best_acc1"]) == (
            epoch,
            "resnet18",
            100.0,
        )


def test_the_linear_classifiers_default_rate_is_the_originals_30(
    colours, tmp_path, sgd_steps
):
    lincls(colours, tmp_path, "--epochs", "1")
    assert {groups[0][0] for groups in sgd_steps} == {30.0}


def test_cached_feature_probe_fits_a_separable_set(colours, tmp_path, sgd_steps):
    epochs = lincls(colours, tmp_path, "--cached-features", "--epochs", "4")
    loss = [e["loss"] for e in epochs]
    assert loss[-1] < 0.1 * loss[0], loss
    assert epochs[-1]["acc1"] == 100.0 and epochs[-1]["val_acc1"] == 100.0, epochs
    assert sgd_steps and all(g[0][3] == [(3, 512), (3,)] for g in sgd_steps)
