"""moco/builder.py and main_moco.train_step against the original's code, written out
independently in tests/original.py: the same seed must give the same weights, queue
and logits, bit for bit (two processes: tests/test_fastpath.py; three:
tests/test_three_processes.py)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from original import (
    OriginalMoCo,
    demo_symmetric_step,
    original_optimizer,
    original_step,
)

from main_moco import train_step
from moco.builder import MoCo

# the original asserts K % (keys per step) == 0; 32 keys make the queue wrap within
# the runs below
DIM, K, M, T = 8, 32, 0.9, 0.2
LR, MOMENTUM, WD = 0.1, 0.9, 1e-4


class TinyEncoder(nn.Module):
    """conv, BatchNorm (which makes the key shuffle matter), ReLU, fc: torch only."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn1(self.conv1(x))).flatten(1))


def build(cls, mlp=False, seed=0, queue=K, **kwargs):
    torch.manual_seed(seed)
    return cls(TinyEncoder, dim=DIM, K=queue, m=M, T=T, mlp=mlp, **kwargs)


def images(n, seed):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("mlp", [False, True])
def test_construction_draws_the_originals_weights_and_queue(mlp):
    model, ref = build(MoCo, mlp), build(OriginalMoCo, mlp)
    assert_same_state(model, ref)
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in ref.parameters()
    ]
    assert (model.K, model.m, model.T) == (ref.K, ref.m, ref.T) == (K, M, T)


def test_one_forward_after_the_query_encoder_moved_is_the_originals():
    model, ref = build(MoCo, mlp=True), build(OriginalMoCo, mlp=True)
    for net in (model, ref):  # as an SGD step would: now the momentum update shows
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in net.encoder_q.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    im_q, im_k = images(8, 1), images(8, 2)
    torch.manual_seed(5)  # the shuffle's draw
    logits, labels = model(im_q, im_k)
    torch.manual_seed(5)
    ref_logits, ref_labels = ref(im_q, im_k)
    assert logits.shape == (8, 1 + K)
    assert torch.equal(logits, ref_logits) and torch.equal(labels, ref_labels)
    assert_same_state(model, ref)  # key encoder, BatchNorm statistics, queue, pointer


def project_steps(model, n_steps, symmetric=False):
    """Training steps through main_moco.train_step, as main_moco runs one process
    (asymmetric: with train_step's defaults, no symmetric loss and no stop)."""
    opt = torch.optim.SGD(model.parameters(), LR, momentum=MOMENTUM, weight_decay=WD)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    extra = {"symmetric": True} if symmetric else {}
    out = []
    for i in range(n_steps):
        torch.manual_seed(1000 + i)
        logits, loss, _, _, stop = train_step(
            model,
            nn.CrossEntropyLoss(),
            opt,
            images(8 if not symmetric else 4, 2 * i),
            images(8 if not symmetric else 4, 2 * i + 1),
            scaler=scaler,
            autocast=torch.autocast("cpu", enabled=False),
            **extra,
        )
        assert stop is False
        out.append((logits.detach(), loss))
    return out, opt


# a queue of 32 keys wraps around in the 5 steps; one of 8 holds exactly one batch
@pytest.mark.parametrize("mlp, queue", [(False, K), (True, K), (False, 8)])
def test_training_steps_are_the_originals_on_one_process(mlp, queue, tmp_path):
    model = build(MoCo, mlp, queue=queue)
    steps, opt = project_steps(model, 5)

    # the original runs only in DistributedDataParallel: here in a group of one
    ref = build(OriginalMoCo, mlp, queue=queue)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", world_size=1, rank=0
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(ref)
        ref_opt = original_optimizer(ddp, LR, MOMENTUM, WD)
        for i, (logits, loss) in enumerate(steps):
            torch.manual_seed(1000 + i)
            ref_logits, ref_loss = original_step(
                ddp,
                nn.CrossEntropyLoss(),
                ref_opt,
                images(8, 2 * i),
                images(8, 2 * i + 1),
            )
            assert torch.equal(logits, ref_logits), i
            assert loss == ref_loss.item(), i
    finally:
        dist.destroy_process_group()
    assert int(model.queue_ptr) == 5 * 8 % queue
    assert_same_state(model, ref)
    assert len(opt.param_groups) == len(ref_opt.param_groups) == 1
    for p, r in zip(model.parameters(), ref.parameters()):
        a, b = opt.state.get(p, {}), ref_opt.state.get(r, {})
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k])


def test_symmetric_steps_are_the_cifar10_demos():
    # 4 images a step: the demo's loss is the sum of two means over 4, the project's
    # twice one mean over 8, and both scale the gradients by exactly 1/4
    model = build(MoCo, symmetric=True)
    steps, _ = project_steps(model, 3, symmetric=True)
    ref = build(OriginalMoCo)
    opt = original_optimizer(ref, LR, MOMENTUM, WD)
    for i, (logits, loss) in enumerate(steps):
        torch.manual_seed(1000 + i)
        ref_loss = demo_symmetric_step(ref, opt, images(4, 2 * i), images(4, 2 * i + 1))
        assert logits.shape == (8, 1 + K)
        # the loss's scale: the two directions' mean losses summed, as the demo's;
        # the value may differ in its last bit (one sum of 8 terms against two of 4)
        assert loss == pytest.approx(ref_loss.item(), rel=1e-6, abs=0), i
    assert int(model.queue_ptr) == 3 * 8 % K
    assert_same_state(model, ref)
