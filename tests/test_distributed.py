"""Two gloo processes give the numbers of one plain, unshuffled computation."""

import copy
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import PORT_BASE, PORT_BLOCK, free_port
from original import OriginalMoCo, original_logits
from test_builder import images, make_moco

from moco.builder import concat_all_gather
from moco.distributed import Launch, init_distributed, local_gpu, wrap_ddp
from moco.utils import UsageError, setup_logging

N = 4  # per process
WORLD = 2


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=WORLD, rank=rank
    )
    try:
        model = make_moco(seed=0)
        ddp = wrap_ddp(model, torch.device("cpu"))
        opt = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4
        )
        im_q = images(N * WORLD, 1)[rank * N : (rank + 1) * N]
        im_k = images(N * WORLD, 2)[rank * N : (rank + 1) * N]

        # process 0's permutation must be used everywhere: the others draw another one
        torch.manual_seed(123 if rank == 0 else 999)
        logits, labels = ddp(im_q, im_k)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

        # the shuffle itself: rows tagged with their global index
        torch.manual_seed(7 if rank == 0 else 8)
        x = (torch.arange(N) + rank * N).float().view(N, 1)
        shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
        mine = model._batch_unshuffle_ddp(shuffled, idx_unshuffle)
        everyone = concat_all_gather(mine)
        # each process's own random queue and weights, wrapped as on torch 2.11/2.12
        # (no forward_sync_buffers) and as on the installed torch
        synced = {}
        for path, ddp_init in (("old", _ddp_init_before_2_13), ("installed", None)):
            unseeded = make_moco(seed=100 + rank)
            wrap_ddp(unseeded, torch.device("cpu"), ddp_init=ddp_init)
            synced[path] = {k: v.clone() for k, v in unseeded.state_dict().items()}
        torch.save(
            {
                "synced": synced,
                "logits": logits.detach(),
                "loss": loss.detach(),
                "labels": labels,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "shuffled": shuffled,
                "mine": mine,
                "everyone": everyone,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _ddp_init_before_2_13(
    self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True
):
    """The signature of DistributedDataParallel before torch 2.13 (its first part)."""


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def _load_buffers(module, buffers):
    # new tensors, not copies: autograd keeps the old ones for the earlier forwards
    for name, sub in module.named_modules():
        for b in list(sub._buffers):
            sub._buffers[b] = buffers[f"{name}.{b}" if name else b].clone()


def reference(n=N, world=WORLD):
    """One process: each rank's chunk through the encoders with that rank's BN buffers."""
    torch.set_num_threads(1)
    model = make_moco(seed=0)
    im_q, im_k = images(n * world, 1), images(n * world, 2)
    OriginalMoCo._momentum_update_key_encoder(model)
    torch.manual_seed(123)
    perm = torch.randperm(n * world)

    start_q, start_k = _buffers(model.encoder_q), _buffers(model.encoder_k)
    qs, ks_shuffled, bufs = [], [], []
    for r in range(world):
        _load_buffers(model.encoder_q, start_q)
        _load_buffers(model.encoder_k, start_k)
        qs.append(F.normalize(model.encoder_q(im_q[r * n : (r + 1) * n]), dim=1))
        with torch.no_grad():
            rows = perm.view(world, n)[r]
            ks_shuffled.append(F.normalize(model.encoder_k(im_k[rows]), dim=1))
        bufs.append((_buffers(model.encoder_q), _buffers(model.encoder_k)))
    k_all = torch.cat(ks_shuffled)[torch.argsort(perm)]
    queue = model.queue.clone()
    logits = []
    for r in range(world):
        k = k_all[r * n : (r + 1) * n]
        q = qs[r]
        logits.append(original_logits(q, k, queue, model.T))
    labels = torch.zeros(n, dtype=torch.long)
    losses = [F.cross_entropy(lg, labels) for lg in logits]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    (sum(losses) / world).backward()  # DDP averages the gradients of the processes
    opt.step()
    new_queue = queue.clone()
    new_queue[:, : n * world] = k_all.T
    states = []
    for r in range(world):
        _load_buffers(model.encoder_q, bufs[r][0])
        _load_buffers(model.encoder_k, bufs[r][1])
        state = copy.deepcopy(model.state_dict())
        state["queue"], state["queue_ptr"] = new_queue, torch.tensor([n * world])
        states.append(state)
    return logits, losses, states


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_two_processes_match_the_plain_single_process_computation(results):
    ref_logits, ref_losses, ref_states = reference()

    # bit for bit: the same operations on the same numbers, whatever the process count
    for r, res in enumerate(results):
        assert torch.equal(res["logits"], ref_logits[r])
        assert torch.equal(res["loss"], ref_losses[r].detach())
        assert torch.equal(res["labels"], torch.zeros(N, dtype=torch.long))
        # weights after the SGD step, queue, pointer, each rank's own BatchNorm statistics
        assert res["state"].keys() == ref_states[r].keys()
        for name, value in ref_states[r].items():
            assert torch.equal(res["state"][name], value), name
    # the queue is the same on every process
    assert torch.equal(results[0]["state"]["queue"], results[1]["state"]["queue"])


def test_shuffle_crosses_processes_and_unshuffle_restores(results):
    torch.manual_seed(7)
    perm = torch.randperm(N * WORLD)  # process 0's draw
    everything = torch.arange(N * WORLD).float().view(-1, 1)
    crossed = False
    for r, res in enumerate(results):
        assert torch.equal(res["shuffled"], everything[perm.view(WORLD, N)[r]])
        crossed |= bool((res["shuffled"].view(-1) // N != r).any())
        assert torch.equal(res["mine"], everything[r * N : (r + 1) * N])
        assert torch.equal(res["everyone"], everything)
    assert crossed, "no image left its process: the shuffle must cross processes"


@pytest.mark.parametrize("torch_version", ["old", "installed"])
def test_ddp_starts_every_process_from_process_0s_queue_and_weights(
    results, torch_version
):
    # torch before 2.13 has no forward_sync_buffers: wrap_ddp detects it and still
    # gives every process process 0's buffers (the queue) at the start
    rank0 = make_moco(seed=100).state_dict()
    for r in range(WORLD):
        state = results[r]["synced"][torch_version]
        assert state.keys() == rank0.keys()
        for k, v in rank0.items():
            assert torch.equal(state[k], v), (r, k)


def test_the_ddp_keyword_follows_the_installed_torchs_signature():
    from moco.distributed import ddp_buffer_option

    assert ddp_buffer_option(_ddp_init_before_2_13) == "broadcast_buffers"
    has_it = (
        "forward_sync_buffers"
        in inspect.signature(
            torch.nn.parallel.DistributedDataParallel.__init__
        ).parameters
    )
    assert ddp_buffer_option() == (
        "forward_sync_buffers" if has_it else "broadcast_buffers"
    )


@pytest.mark.parametrize(
    "local_rank, visible, expected", [(0, 8, 0), (3, 8, 3), (3, 1, 0), (0, 1, 0)]
)
def test_each_process_takes_its_own_gpu_or_the_only_one_it_sees(
    local_rank, visible, expected
):
    assert local_gpu(local_rank, visible) == expected


def test_a_process_that_sees_neither_its_gpu_nor_one_gpu_is_refused():
    with pytest.raises(UsageError, match="sees 2 GPUs"):
        local_gpu(3, 2)


def test_torchrun_with_each_process_shown_its_own_gpu_runs_one_process_per_gpu(
    monkeypatch,
):
    # torchrun, 4 processes on this node; a scheduler shows each process one GPU of
    # its own through CUDA_VISIBLE_DEVICES, so torch sees 1 GPU in each
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    for name, value in {**torchrun, "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    used = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: used.update(device=d))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: used.update(kw))
    settings = Launch()  # the launch flags' defaults, as `torchrun main_moco.py DATA`
    settings.check(batch_size=256)  # accepted: 64 images a process
    assert (settings.processes_per_node(), settings.total_processes()) == (4, 4)
    try:
        env = init_distributed(3, settings.processes_per_node(), settings)
    finally:
        setup_logging(0)  # as this process logged before
    # process 3 of the node takes the one GPU it sees, in a group of 4 over NCCL
    assert env.device == torch.device("cuda", 0) and used["device"] == env.device
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 3)
    assert (used["rank"], used["world_size"], used["backend"]) == (3, 4, "nccl")
    assert used["init_method"] == "env://"
    # the same node without CUDA_VISIBLE_DEVICES has one GPU for 4 processes
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(UsageError, match="4 processes per node but only 1 GPUs"):
        settings.check(batch_size=256)
    # spawned processes share their parent's CUDA_VISIBLE_DEVICES: one GPU for two
    for name in torchrun:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    spawned = Launch(multiprocessing_distributed=True, procs_per_node=2, world_size=1)
    with pytest.raises(UsageError, match="2 processes per node but only 1 GPUs"):
        spawned.check(batch_size=256)


def test_each_test_worker_draws_its_ports_from_its_own_block(monkeypatch):
    """Two pytest-xdist workers never pick the same port, nor one the kernel hands out."""
    blocks = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        blocks[worker] = {free_port() for _ in range(20)}
    first, second = PORT_BASE, PORT_BASE + PORT_BLOCK
    assert all(first <= p < second for p in blocks["gw0"]), blocks
    assert all(second <= p < second + PORT_BLOCK for p in blocks["gw1"]), blocks
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert first <= free_port() < second  # plain pytest: the first block
    ranges = "/proc/sys/net/ipv4/ip_local_port_range"
    if os.path.exists(ranges):
        with open(ranges) as f:
            assert max(blocks["gw1"]) < int(f.read().split()[0])
