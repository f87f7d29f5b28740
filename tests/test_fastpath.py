"""The fast training step computes exactly what the original's formulas compute.

The builder updates the key encoder in place, enqueues without reading the pointer
on the host and shuffles with all_to_all; tests/original.py does the same steps the
original's way (new tensors every step, every image gathered to every process, the
keys gathered again for the queue, a slice enqueue).
"""

import copy
import os
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO, free_port, load, moco_args, run_moco
from original import OriginalMoCo, original_copy, original_optimizer, original_step
from syncs import SyncCounter
from test_builder import images, make_moco
from test_original import build
from test_original import images as tiny

from main_moco import train_step
from moco.builder import MoCo
from moco.distributed import wrap_ddp
from moco.utils import NonFiniteLossError, UsageError


def train_steps(model, steps, n, seed, ddp=None, images=images):
    """SGD steps through main_moco.train_step; returns each step's logits and loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = []
    for i in range(steps):
        # the shuffle's draw
        torch.manual_seed(seed + i)
        logits, loss = train_step(
            ddp or model,
            nn.CrossEntropyLoss(),
            opt,
            images(n, 2 * i + seed),
            images(n, 2 * i + seed + 1),
            scaler=scaler,
            autocast=torch.autocast("cpu", enabled=False),
            symmetric=model.symmetric,
        )[:2]
        out.append((logits.detach(), loss))
    return out


def step_syncs(model, ddp=None, seed=0, images=images):
    """What one train_step would make the host wait for on a GPU (tests/syncs.py)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    with SyncCounter(model, opt) as syncs:
        for _ in range(2):  # the second with the optimizer's momentum buffers
            syncs.events.clear()
            im_q, im_k = images(4, seed), images(4, seed + 1)
            syncs.on_device(im_q, im_k)
            train_step(
                ddp or model,
                nn.CrossEntropyLoss(),
                opt,
                im_q,
                im_k,
                scaler=torch.amp.GradScaler("cpu", enabled=False),
                autocast=torch.autocast("cpu", enabled=False),
                symmetric=model.symmetric,
            )
    return syncs.events


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_training_step_on_one_process_waits_once_for_its_values(symmetric):
    # the loss, the accuracies and the stop and non-finite flags, read together
    assert step_syncs(make_moco(symmetric=symmetric)) == ["read: tolist"]


def test_momentum_update_is_in_place_and_bit_identical_over_steps():
    for m in (0.99, 0.999):
        model = make_moco(m=m)
        ref = original_copy(model)
        storage = [p.data_ptr() for p in model.encoder_k.parameters()]
        for step in range(3):
            for mod in (model, ref):
                torch.manual_seed(step)
                with torch.no_grad():
                    for p in mod.encoder_q.parameters():
                        p.add_(torch.randn_like(p))  # a training step's change
                mod._momentum_update_key_encoder()
            for pk, pr in zip(model.encoder_k.parameters(), ref.encoder_k.parameters()):
                assert torch.equal(pk, pr)
        # the same tensors, updated in place: nothing is allocated or rebound
        assert [p.data_ptr() for p in model.encoder_k.parameters()] == storage
    assert not any("scratch" in k for k in model.state_dict())


# ---------------------------------------------------------------- two processes
N, WORLD = 4, 2


def _two_process_worker(rank, port):
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, world_size=WORLD, rank=rank)
    try:
        sent_images = []  # (collective, rows this process receives)
        all_gather, all_to_all = dist.all_gather, dist.all_to_all_single

        def gather_counting(out, t, *a, **k):
            if t.dim() == 4:
                sent_images.append(("all_gather", WORLD * t.shape[0]))
            return all_gather(out, t, *a, **k)

        def all_to_all_counting(out, inp, *a, **k):
            if inp.dim() == 4:
                sent_images.append(("all_to_all", out.shape[0]))
            return all_to_all(out, inp, *a, **k)

        dist.all_gather, dist.all_to_all_single = gather_counting, all_to_all_counting

        # the shuffle alone: rows tagged with process and position, process 0's draw
        model = make_moco(seed=0)
        x = (100 * rank + torch.arange(N * 3 * 2 * 2)).float().view(N, 3, 2, 2)
        for trial in range(3):
            # the processes draw different permutations
            torch.manual_seed(10 * trial + rank)
            state = torch.get_rng_state()
            fast, idx_fast = model._batch_shuffle_ddp(x)
            torch.set_rng_state(state)
            ref, idx_ref = OriginalMoCo._batch_shuffle_ddp(model, x)
            assert torch.equal(fast, ref) and torch.equal(idx_fast, idx_ref)
            keys = torch.randn(N, 8)
            assert torch.equal(
                model._batch_unshuffle_ddp(keys, idx_fast),
                OriginalMoCo._batch_unshuffle_ddp(model, keys, idx_ref),
            )
        # each process received only its own batch of images, not the global batch
        assert sent_images[0::2] == [("all_to_all", N)] * 3
        assert sent_images[1::2] == [("all_gather", N * WORLD)] * 3
        # channels-last images stay channels-last through the exchange (--channels-last)
        torch.manual_seed(rank)
        state = torch.get_rng_state()
        last = model._batch_shuffle_ddp(x.to(memory_format=torch.channels_last))[0]
        torch.set_rng_state(state)
        assert last.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(last, model._batch_shuffle_ddp(x)[0])

        # whole training steps, main_moco's (DDP as it builds it, train_step) against
        # the original's (its DDP, broadcasting buffers; its step), each built from
        # the same seed: the same numbers
        model, ref = build(MoCo), build(OriginalMoCo)
        ddp = wrap_ddp(model, torch.device("cpu"))
        ddp_ref = nn.parallel.DistributedDataParallel(ref)
        seed = 20 + rank  # each process its own images and its own draws
        ref_opt = original_optimizer(ddp_ref, 0.1, 0.9, 1e-4)
        for i, (logits, loss) in enumerate(train_steps(model, 5, N, seed, ddp, tiny)):
            torch.manual_seed(seed + i)
            ref_logits, ref_loss = original_step(
                ddp_ref,
                nn.CrossEntropyLoss(),
                ref_opt,
                tiny(N, 2 * i + seed),
                tiny(N, 2 * i + seed + 1),
            )
            assert torch.equal(logits, ref_logits) and loss == ref_loss.item(), i
        # process 0's BatchNorm statistics, which the original broadcasts to the
        # others before every forward, are the same too
        sm, sr = model.state_dict(), ref.state_dict()
        for k in sm:
            if rank == 0 or "running" not in k and "num_batches" not in k:
                assert torch.equal(sm[k], sr[k]), k
        assert int(model.queue_ptr) == 5 * N * WORLD % model.K
        queues = [torch.empty_like(model.queue) for _ in range(WORLD)]
        all_gather(queues, model.queue)
        assert torch.equal(queues[0], queues[1])

        # the permutation's trip to the host for the all-to-all's split sizes, and the
        # step's one read, which holds every process's stop and non-finite flags
        assert step_syncs(model, ddp, 70 + rank, tiny) == ["read: cpu", "read: tolist"]

        # a stop signal or a non-finite loss on one process stops both at this step
        def step(criterion=F.cross_entropy, stop_requested=False):
            return train_step(
                ddp,
                criterion,
                opt,
                tiny(N, 50 + rank),
                tiny(N, 60 + rank),
                scaler=torch.amp.GradScaler("cpu", enabled=False),
                autocast=torch.autocast("cpu", enabled=False),
                stop_requested=stop_requested,
            )[4]

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        assert step(stop_requested=rank == 1) and not step()
        weights = [p.clone() for p in model.encoder_q.parameters()]

        def nan_on_process_1(output, target):
            loss = F.cross_entropy(output, target)
            return loss * float("nan") if rank == 1 else loss

        elsewhere = "non-finite elsewhere" if rank == 0 else "the loss became nan"
        with pytest.raises(NonFiniteLossError, match=elsewhere):
            step(nan_on_process_1)
        # stopped before the update, on both
        assert all(map(torch.equal, weights, model.encoder_q.parameters()))
    finally:
        dist.destroy_process_group()


def test_all_to_all_shuffle_gives_the_gather_shuffle_and_the_same_steps_on_two_processes():
    mp.spawn(_two_process_worker, args=(free_port(),), nprocs=WORLD)


# ---------------------------------------------------------------- fast-path flags
def test_channels_last_gives_the_contiguous_results():
    model = make_moco()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(train_steps(model, 2, 4, seed=30), train_steps(cl, 2, 4, seed=30)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for p, q in zip(model.parameters(), cl.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(model.queue, cl.queue, rtol=1e-4, atol=1e-5)


class TinyNet(nn.Module):
    """A conv, BatchNorm and fc: compiles in seconds."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn1(self.conv1(x))).mean((2, 3)))


@pytest.mark.skipif(
    not shutil.which(os.environ.get("CXX", "g++")), reason="no C++ compiler"
)
def test_compiled_encoders_keep_state_dict_names_and_results(tmp_path, monkeypatch):
    # a cache of its own: compiled kernels cached by other runs (another
    # ATEN_CPU_CAPABILITY, another torch) are not loaded
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # compiled in this process: a pool of compile workers takes longer to start on
    # 2 cores than the few kernels take to build
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    torch.manual_seed(0)
    model = MoCo(TinyNet, dim=8, K=16, m=0.9, T=0.2, mlp=True)
    eager = copy.deepcopy(model)
    model.encoder_q.compile()  # as main_moco --compile: the module compiled in place
    model.encoder_k.compile()
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints unchanged
    for a, b in zip(
        train_steps(model, 2, 4, seed=40), train_steps(eager, 2, 4, seed=40)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.queue, eager.queue, rtol=1e-4, atol=1e-5)
    assert os.listdir(tmp_path / "inductor")  # compiled here, not read from elsewhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_float16_autocast_is_refused_on_the_cpu(image_folder, tmp_path):
    import main_moco

    with pytest.raises(UsageError, match="float16 needs a GPU"):
        main_moco.check_args(
            moco_args(image_folder, tmp_path, "--amp", "--amp-dtype", "float16")
        )


def test_compile_without_a_cpp_compiler_is_refused(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(UsageError, match="C\\+\\+ compiler"):
        run_moco(image_folder, tmp_path / "out", "--compile")
    assert os.listdir(tmp_path / "out") == []  # refused before anything was written


def test_amp_and_channels_last_train_on_the_cpu(image_folder, tmp_path):
    run_moco(image_folder, tmp_path, "--amp", "--channels-last")
    sd = load(tmp_path / "checkpoint_0000.pth.tar")["state_dict"]
    assert sd["module.queue"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    torch.testing.assert_close(sd["module.queue"].norm(dim=0), torch.ones(64))


# ---------------------------------------------------------------- the benchmark
def test_benchmark_prints_the_step_the_floor_and_the_parts(capsys):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import step
    finally:
        sys.path.pop(0)
    argv = [
        "-a",
        "resnet18",
        "--small-stem",
        "--input-size",
        "16",
        "-b",
        "4",
        "--moco-k",
        "16",
        "--moco-dim",
        "8",
        "--mlp",
        "--original",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--part-reps",
        "1",
        "--threads",
        "1",
    ]
    step.main(step.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    for line in (
        "(a) step",
        "(b) floor",
        "(o) original",
        "ratio (a)/(b) =",
        "momentum update",
        "shuffle (images)",
        "logits + CE",
        "queue.clone()",
        "enqueue",
        "ratio from the parts",
    ):
        assert line in out, line


def test_a_step_updates_the_gradient_scaler():
    # --amp-dtype float16 scales the loss; the scaler then grows its scale after
    # steps with finite gradients (here after every one) and must be told each step
    def one_step(model, scaler):
        torch.manual_seed(0)  # the shuffle's draw
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(
            model,
            nn.CrossEntropyLoss(),
            opt,
            images(4, 0),
            images(4, 1),
            scaler=scaler,
            autocast=torch.autocast("cpu", enabled=False),
        )

    scaled, plain = make_moco(), make_moco()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    one_step(scaled, scaler)
    one_step(plain, torch.amp.GradScaler("cpu", enabled=False))
    assert scaler.get_scale() == 2.0**11
    # the update used the unscaled gradients (a power of two: exactly the same)
    for a, b in zip(scaled.parameters(), plain.parameters()):
        assert torch.equal(a, b)
