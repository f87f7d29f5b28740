"""The key shuffle across three processes against the original's: with three, a
process sends and receives different numbers of rows to and from each other one (with
two they are always equal), and batches of 40 rows tell a stable sort from an
unstable one."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from original import OriginalMoCo

from moco.builder import MoCo

N, WORLD = 40, 3


def _worker(rank, port):
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, world_size=WORLD, rank=rank)
    try:
        model = MoCo(lambda num_classes: nn.Linear(2, num_classes), dim=4, K=N * WORLD)
        # rows tagged with their process and position
        x = (1000 * rank + torch.arange(N * 2)).float().view(N, 2, 1, 1)
        unequal = 0
        for trial in range(3):
            torch.manual_seed(10 * trial + rank)  # each process its own draw
            state = torch.get_rng_state()
            mine, idx = model._batch_shuffle_ddp(x)
            torch.set_rng_state(state)
            theirs, ref_idx = OriginalMoCo._batch_shuffle_ddp(model, x)
            assert torch.equal(mine, theirs) and torch.equal(idx, ref_idx), trial
            keys = torch.randn(N, 4)
            assert torch.equal(
                model._batch_unshuffle_ddp(keys, idx),
                OriginalMoCo._batch_unshuffle_ddp(model, keys, ref_idx),
            )
            # how many of its rows each process sends to each, and receives
            owner = idx.argsort().view(WORLD, N) // N  # whose rows each takes
            sent = (owner == rank).sum(dim=1)
            received = torch.bincount(owner[rank], minlength=WORLD)
            unequal += int(not torch.equal(sent, received))
        assert unequal  # the exchange was uneven in some trial
    finally:
        dist.destroy_process_group()


def test_shuffle_over_three_processes_gives_the_originals_rows():
    # imported here: the spawned processes import this file, and need no more
    from conftest import free_port

    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD)
