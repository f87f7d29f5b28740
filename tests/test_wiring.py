"""Each of main_moco.py's settings reaches where it acts: the model's momentum,
temperature, queue and head, the optimizer's rate (epoch by epoch, cosine or steps),
momentum and weight decay, the augmentation recipe; and the samplers give each process
its own share of the data."""

import math

import pytest
import torch
from conftest import load, make_image_folder
from PIL import ImageFilter

import main_moco
from moco.builder import MoCo
from moco.data import EpochSampler
from moco.utils import adjust_learning_rate, learning_rate


# the original's adjust_learning_rate, written out: the rate of a (whole) epoch
def cosine_rate(lr, epoch, epochs):
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def step_rate(lr, epoch, milestones):
    return lr * 0.1 ** sum(epoch >= m for m in milestones)


def test_the_schedules_are_the_originals_formulas():
    for epoch in range(10):
        assert learning_rate(epoch, 0.03, 10, cos=True) == pytest.approx(
            cosine_rate(0.03, epoch, 10), rel=1e-12
        )
        assert learning_rate(epoch, 0.03, 10, [3, 7]) == pytest.approx(
            step_rate(0.03, epoch, [3, 7]), rel=1e-12
        )
    # the 200-epoch recipes: cosine halves at 100, the steps drop at 120 and 160
    assert learning_rate(100, 0.03, 200, cos=True) == pytest.approx(0.015)
    assert learning_rate(199, 0.03, 200, [120, 160]) == pytest.approx(0.0003)
    # the cosine ignores the milestones
    assert learning_rate(5, 1.0, 10, [1], cos=True) == pytest.approx(0.5)
    optimizer = torch.optim.SGD(
        [{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=1.0
    )
    assert adjust_learning_rate(optimizer, 2, 0.5, 4, cos=True) == pytest.approx(0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.25)] * 2


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory):
    """8 images: one step of 8 an epoch."""
    root = tmp_path_factory.mktemp("eight")
    return make_image_folder(root / "data", classes=2, per_class=4, size=24)


@pytest.fixture
def spied(monkeypatch):
    """
    What every MoCo forward and SGD step of a run saw: the encoders' parameters before
    and after the forward, the queue before it, the logits; each SGD group's settings.
    """
    forwards, steps, blurs = [], [], []
    real_forward, real_step = MoCo.forward, torch.optim.SGD.step

    def params(encoder):
        return [p.detach().clone() for p in encoder.parameters()]

    def forward(self, im_q, im_k):
        seen = {
            "q": params(self.encoder_q),
            "k": params(self.encoder_k),
            "queue": self.queue.clone(),
            "batch": im_q.shape[0],
            "model_params": len(list(self.parameters())),
            "fc": self.encoder_q.fc,
        }
        logits, labels = real_forward(self, im_q, im_k)
        forwards.append({**seen, "k_after": params(self.encoder_k), "logits": logits})
        return logits, labels

    def step(self, *args, **kwargs):
        groups = [
            (g["lr"], g["momentum"], g["weight_decay"], len(g["params"]))
            for g in self.param_groups
        ]
        steps.append(groups)
        return real_step(self, *args, **kwargs)

    real_blur = ImageFilter.GaussianBlur.filter

    def blur(self, image):
        blurs.append(self.radius)
        return real_blur(self, image)

    monkeypatch.setattr(MoCo, "forward", forward)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(ImageFilter.GaussianBlur, "filter", blur)
    return forwards, steps, blurs


def pretrain(data, out, *extra):
    argv = [data, "-a", "shufflenet_v2_x0_5", "--input-size", "16", "-b", "8"]
    argv += ["-j", "0", "-p", "100", "--seed", "0", "--epochs", "3"]
    argv += ["--aug-impl", "original", "--output-dir", str(out), *extra]
    main_moco.main(main_moco.get_args_parser().parse_args(argv))


def temperature(record):
    """
    The temperature the logits were divided by: l_neg = q . queue / T with a unit q
    and the queue as it was, so solving for q / T gives a vector of length 1 / T.
    """
    queue, logits = record["queue"].double(), record["logits"].detach().double()
    q_over_t = torch.linalg.lstsq(queue.T, logits[:, 1:].T).solution  # dim x N
    return 1 / q_over_t.norm(dim=0)


def assert_momentum(record, m):
    """The key encoder moved to m k + (1 - m) q in the forward."""
    for q, k, k_after in zip(record["q"], record["k"], record["k_after"]):
        torch.testing.assert_close(k_after, m * k + (1 - m) * q)


def test_moco_flags_reach_the_model_the_optimizer_and_the_cosine_schedule(
    eight_images, tmp_path, spied
):
    forwards, steps, blurs = spied
    pretrain(
        eight_images,
        tmp_path,
        *("--moco-m", "0.7", "--moco-t", "0.3", "--moco-k", "24", "--moco-dim", "8"),
        *("--mlp", "--cos", "--lr", "0.5", "--momentum", "0.8", "--wd", "1e-3"),
    )
    assert len(forwards) == len(steps) == 3  # one step an epoch
    for i, record in enumerate(forwards):
        assert record["batch"] == 8
        assert record["logits"].shape == (8, 1 + 24)
        assert record["queue"].shape == (8, 24)
        torch.testing.assert_close(temperature(record), torch.full((8,), 0.3).double())
        assert (record["logits"][:, 0].abs() <= 1 / 0.3 + 1e-5).all()
        if i:  # at the first step the key encoder is still the query encoder's copy
            assert_momentum(record, 0.7)
            assert not torch.equal(record["k"][-1], record["q"][-1])
    # the MLP head: fc(relu(linear)) of the backbone's width
    fc = forwards[0]["fc"]
    assert [type(x).__name__ for x in fc] == ["Linear", "ReLU", "Linear"]
    assert fc[0].in_features == fc[0].out_features == fc[2].in_features
    assert fc[2].out_features == 8
    # one group over every parameter of the model, the cosine's rate of each epoch
    n = forwards[0]["model_params"]
    assert steps == [
        [(pytest.approx(cosine_rate(0.5, e, 3)), 0.8, 1e-3, n)] for e in range(3)
    ]
    assert not blurs  # MoCo v1's augmentation has no blur
    # the original's checkpoint: completed epochs, its keys, 0-based file names
    state = load(tmp_path / "checkpoint_0002.pth.tar")
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(state)
    assert (state["epoch"], state["arch"]) == (3, "shufflenet_v2_x0_5")
    sd = state["state_dict"]
    assert sd["module.queue"].shape == (8, 24) and int(sd["module.queue_ptr"]) == 0
    assert sd["module.encoder_q.fc.2.weight"].shape[0] == 8
    groups = state["optimizer"]["param_groups"]
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in groups] == [
        (pytest.approx(cosine_rate(0.5, 2, 3)), 0.8, 1e-3)
    ]


def test_step_schedule_default_moco_settings_and_aug_plus(
    eight_images, tmp_path, spied
):
    forwards, steps, blurs = spied
    pretrain(
        eight_images,
        tmp_path,
        *("--moco-k", "16", "--moco-dim", "8", "--lr", "0.5", "--schedule", "1", "2"),
        "--aug-plus",
    )
    assert [groups[0][0] for groups in steps] == [
        pytest.approx(step_rate(0.5, e, [1, 2])) for e in range(3)
    ]
    # the defaults: momentum 0.999, temperature 0.07, SGD momentum 0.9, wd 1e-4
    for i, record in enumerate(forwards):
        torch.testing.assert_close(temperature(record), torch.full((8,), 0.07).double())
        if i:
            assert_momentum(record, 0.999)
    assert {groups[0][1:3] for groups in steps} == {(0.9, 1e-4)}
    assert type(forwards[0]["fc"]).__name__ == "Linear"  # no --mlp: the linear head
    assert blurs  # --aug-plus is MoCo v2's augmentation, which blurs


@pytest.mark.parametrize("n, world", [(24, 2), (24, 3), (25, 2), (7, 4)])
def test_epoch_sampler_gives_each_process_its_own_share_of_the_set(n, world):
    for epoch in (0, 1):
        shares = []
        for rank in range(world):
            sampler = EpochSampler(list(range(n)), world, rank, data_seed=5)
            sampler.set_epoch(epoch)
            shares.append([index for index, _ in sampler])
        size = math.ceil(n / world)
        assert all(len(s) == size for s in shares)
        everything = [i for s in shares for i in s]
        assert set(everything) == set(range(n))
        # equal shares: the first few indices of the epoch's order fill the last one
        assert len(everything) - len(set(everything)) == size * world - n
    # each epoch its own order
    orders = []
    for epoch in (0, 1):
        sampler = EpochSampler(list(range(n)), data_seed=5)
        sampler.set_epoch(epoch)
        orders.append([index for index, _ in sampler])
    assert orders[0] != orders[1]


def test_epoch_sampler_resumes_within_an_epoch_and_starts_at_its_first_sample():
    sampler = EpochSampler(list(range(10)), data_seed=5)
    fresh = list(sampler)  # no set_epoch yet: all of epoch 0
    sampler.set_epoch(0)
    assert fresh == list(sampler) and len(sampler) == 10
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.set_epoch(3, start=4)  # resumed after 4 samples of epoch 3
    assert list(sampler) == whole[4:] and len(sampler) == 6


def test_every_sample_of_every_epoch_gets_its_own_augmentation_seed():
    seeds = []
    for data_seed in (0, 1):
        for epoch in range(3):
            sampler = EpochSampler(list(range(1000)), data_seed=data_seed)
            sampler.set_epoch(epoch)
            seeds += [seed for _, seed in sampler]
    assert len(set(seeds)) == len(seeds) == 6000
