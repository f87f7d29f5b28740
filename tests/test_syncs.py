"""The sync counter (tests/syncs.py) counts what would make the host wait on CUDA, and
nothing else; and the key shuffle waits at most once, for its split sizes."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import free_port
from syncs import SyncCounter

from moco.builder import MoCo


def counted(fn, *on_device):
    with SyncCounter(*on_device) as syncs:
        fn()
    return syncs.events


def test_work_on_the_host_alone_is_not_counted():
    def host_work():
        idx = torch.randperm(8)
        counts = torch.bincount(idx % 3, minlength=3).tolist()
        rows = idx[idx > 2]
        assert sum(counts) == 8 and rows.numel() == 5 and bool(idx.sum() == 28)

    assert counted(host_work) == []


def test_each_kind_of_wait_is_counted_once():
    x = torch.randn(8)
    host = torch.arange(4)
    cases = {
        "item": lambda: x.sum().item(),
        "tolist": lambda: x.tolist(),
        "bool": lambda: bool(x[0] > 0),
        "float": lambda: float(x[0]),
        "cpu": lambda: x.cpu(),
        "to cpu": lambda: x.to("cpu"),
        "nonzero": lambda: (x > 0).nonzero(),
        "boolean mask": lambda: x[x > 0],
        "masked assignment": lambda: x.clone().__setitem__(x > 0, 0.0),
        "bincount": lambda: torch.bincount((x > 0).long()),
        "unique": lambda: torch.unique(x),
        "repeat_interleave": lambda: x.repeat_interleave((x > 0).long()),
        "tensor(device=)": lambda: torch.tensor([1, 2], device=x.device),
        "as_tensor(device=)": lambda: torch.as_tensor([1, 2], device=x.device),
        "blocking .to": lambda: host.to(x.device),
        "host index": lambda: x[host],
        "blocking copy_": lambda: x[:4].copy_(host.float()),
    }
    for name, case in cases.items():
        events = counted(case, x)
        assert len(events) == 1, (name, events)


def test_device_work_and_non_blocking_copies_are_not_counted():
    x = torch.randn(8)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        idx = torch.randperm(8).to(x.device, non_blocking=True)
        batch = x[idx].view(2, 4).repeat(1, 2)
        loss = nn.functional.cross_entropy(
            model(batch), torch.zeros(2, dtype=torch.long, device=x.device)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model[0].weight.mul_(0.5)  # an in-place update on the device
        return loss

    assert counted(step, x, model, opt) == []
    # the one read a training step needs
    assert len(counted(lambda: step().item(), x, model, opt)) == 1


def make_model():
    torch.manual_seed(0)
    return MoCo(
        lambda num_classes: nn.Sequential(
            nn.Conv2d(3, 4, 4, stride=4),  # 16x16 -> 4x4
            nn.BatchNorm2d(4),
            nn.Flatten(),
            nn.Linear(64, num_classes),
        ),
        dim=8,
        K=32,
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_moco_forward_on_one_process_never_waits(symmetric):
    model = make_model()
    model.symmetric = symmetric
    with SyncCounter(model) as syncs:
        x = torch.randn(4, 3, 16, 16)
        syncs.on_device(x)
        logits, labels = model(x, x.clone())
        syncs.on_device(logits)
    assert syncs.events == []


def _two_process_forward(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = make_model()
        with SyncCounter(model) as syncs:
            x = torch.randn(4, 3, 16, 16)
            syncs.on_device(x)
            model(x, x.clone())
        out.put((rank, syncs.events))
    finally:
        dist.destroy_process_group()


def test_the_key_shuffle_over_two_processes_waits_once_for_its_split_sizes():
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _two_process_forward, args=(free_port(), out), nprocs=2, start_method="spawn"
    )
    events = dict(out.get() for _ in range(2))
    # the permutation's one trip to the host: all_to_all needs its split sizes there
    assert events == {0: ["read: cpu"], 1: ["read: cpu"]}
