"""moco/builder.py against the original's formulas, computed independently here."""

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from original import OriginalMoCo, original_copy, original_logits

from moco.builder import MoCo
from moco.models import SplitBatchNorm, build_encoder

DIM, K = 16, 32


def tiny_encoder(num_classes):
    """A small ResNet-18 with the CIFAR stem: quick on the CPU."""
    return build_encoder("resnet18", num_classes=num_classes, small_stem=True)


def make_moco(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"dim": DIM, "K": K, "m": 0.9, "T": 0.2, **kwargs}
    return MoCo(tiny_encoder, **kwargs)


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g)


def test_construction_uses_the_rng_as_the_original():
    torch.manual_seed(0)
    enc_q = tiny_encoder(num_classes=DIM)
    enc_k = tiny_encoder(num_classes=DIM)
    queue = F.normalize(torch.randn(DIM, K), dim=0)
    model = make_moco(seed=0)
    for (name, p), p_ref in zip(
        model.encoder_q.state_dict().items(), enc_q.state_dict().values()
    ):
        assert torch.equal(p, p_ref), name
    # the key encoder starts as a copy of the query encoder, not as its own init
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad
    assert not all(
        torch.equal(a, b)
        for a, b in zip(enc_k.parameters(), model.encoder_k.parameters())
    )
    assert torch.equal(model.queue, queue)
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == (1,)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(K))


def test_mlp_head_names_and_resnet50_key_count():
    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet50, mlp=True)
    keys = ["module." + k for k in model.state_dict()]
    assert len(keys) == 646
    for enc in ("encoder_q", "encoder_k"):
        for name in ("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"):
            assert f"module.{enc}.{name}" in keys
    assert isinstance(model.encoder_q.fc[1], nn.ReLU)
    assert model.queue.shape == (128, 65536)


def test_one_step_equals_the_original_formulas():
    model = make_moco()
    ref = original_copy(model)
    im_q, im_k = images(8, 1), images(8, 2)

    # the same draw in both shuffles
    torch.manual_seed(123)
    logits, labels = model(im_q, im_k)
    torch.manual_seed(123)
    ref_logits, _ = ref(im_q, im_k)
    ref_queue, ref_ptr = ref.queue, int(ref.queue_ptr)

    assert logits.shape == (8, 1 + K)
    assert labels.dtype == torch.long and torch.equal(
        labels, torch.zeros(8, dtype=torch.long)
    )
    assert torch.equal(logits, ref_logits)
    assert torch.equal(model.queue, ref_queue)
    assert int(model.queue_ptr) == ref_ptr == 8
    for p, p_ref in zip(model.encoder_k.parameters(), ref.encoder_k.parameters()):
        assert torch.equal(p, p_ref)  # momentum update bit for bit

    # and one SGD step on the loss gives the same weights
    for m, lg in ((model, logits), (ref, ref_logits)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        F.cross_entropy(lg, torch.zeros(8, dtype=torch.long)).backward()
        opt.step()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, p_ref), name


def test_positive_logit_is_column_zero():
    model = make_moco()
    model.eval()  # fixed BatchNorm statistics: the same image gives the same feature
    x = images(4, 3)
    logits, _ = model(x, x)
    # query and key encoders are equal at start: each positive is 1/T, the maximum
    torch.testing.assert_close(logits[:, 0], torch.full((4,), 1 / model.T))
    assert (logits[:, 0:1] >= logits[:, 1:]).all()


def test_momentum_update_is_the_original_formula_bit_for_bit():
    model = make_moco()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    ref = original_copy(model)
    ref._momentum_update_key_encoder()
    model._momentum_update_key_encoder()
    for p, e in zip(model.encoder_k.parameters(), ref.encoder_k.parameters()):
        assert torch.equal(p, e)


def test_momentum_update_leaves_key_batchnorm_statistics_alone():
    model = make_moco()
    model.train()
    model.encoder_q(images(8, 4))  # changes the query encoder's running statistics only
    before = {
        k: v.clone() for k, v in model.encoder_k.state_dict().items() if "running" in k
    }
    model._momentum_update_key_encoder()
    after = model.encoder_k.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    q_stats = model.encoder_q.state_dict()
    assert any(not torch.equal(q_stats[k], v) for k, v in before.items())


def test_no_gradient_reaches_the_key_encoder():
    model = make_moco()
    logits, labels = model(images(8, 5), images(8, 6))
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())


def test_queue_pointer_wraps_around_when_k_is_not_a_multiple_of_the_batch():
    model = make_moco(K=10)
    keys = [F.normalize(torch.randn(4, DIM), dim=1) for _ in range(3)]
    for k in keys:
        model._dequeue_and_enqueue(k)
    # columns 0-3, 4-7, then 8, 9, 0, 1
    assert int(model.queue_ptr) == 2
    assert torch.equal(model.queue[:, 0:2], keys[2][2:].T)
    assert torch.equal(model.queue[:, 2:4], keys[0][2:].T)
    assert torch.equal(model.queue[:, 4:8], keys[1].T)
    assert torch.equal(model.queue[:, 8:10], keys[2][:2].T)


def test_enqueue_refuses_more_keys_than_the_queue_holds():
    model = make_moco(K=4)
    with pytest.raises(AssertionError):
        model._dequeue_and_enqueue(torch.randn(5, DIM))


def test_shuffle_then_unshuffle_is_the_identity_and_shuffles():
    model = make_moco()
    x = torch.arange(16.0).view(16, 1)
    torch.manual_seed(0)
    shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
    assert not torch.equal(shuffled, x)
    assert torch.equal(model._batch_unshuffle_ddp(shuffled, idx_unshuffle), x)


def test_symmetric_loss_uses_both_directions_and_enqueues_both_keys():
    model = make_moco(symmetric=True)
    ref = copy.deepcopy(model)
    im_1, im_2 = images(4, 7), images(4, 8)
    torch.manual_seed(5)
    logits, labels = model(im_1, im_2)
    assert logits.shape == (8, 1 + K) and labels.shape == (8,)

    torch.manual_seed(5)
    perm_12, perm_21 = torch.randperm(4), torch.randperm(4)
    OriginalMoCo._momentum_update_key_encoder(ref)

    def direction(a, b, perm):
        q = F.normalize(ref.encoder_q(a), dim=1)
        with torch.no_grad():
            k = F.normalize(ref.encoder_k(b[perm]), dim=1)[torch.argsort(perm)]
        return original_logits(q, k, ref.queue, ref.T), k

    l_12, k_2 = direction(im_1, im_2, perm_12)
    l_21, k_1 = direction(im_2, im_1, perm_21)
    assert torch.equal(logits, torch.cat([l_12, l_21]))
    assert torch.equal(model.queue[:, :8], torch.cat([k_1, k_2]).T)
    assert int(model.queue_ptr) == 8


def test_logits_and_queue_stay_float32_under_autocast():
    model = make_moco()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(images(4, 9), images(4, 10))
    assert logits.dtype == torch.float32 and model.queue.dtype == torch.float32


def test_split_batchnorm_normalises_each_group_like_its_own_gpu():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    split = SplitBatchNorm(3, num_splits=2)
    split.load_state_dict(bn.state_dict())
    assert list(split.state_dict()) == list(bn.state_dict())
    x = torch.randn(8, 3, 4, 4)
    out = split(x)
    groups = [x[0::2], x[1::2]]  # group j holds samples j, j + 2, ...
    bns = [copy.deepcopy(bn) for _ in groups]
    for j, g in enumerate(groups):
        torch.testing.assert_close(out[j::2], bns[j](g))
    torch.testing.assert_close(
        split.running_mean, (bns[0].running_mean + bns[1].running_mean) / 2
    )
    torch.testing.assert_close(
        split.running_var, (bns[0].running_var + bns[1].running_var) / 2
    )
    split.eval()
    bn.running_mean.copy_(split.running_mean)
    bn.running_var.copy_(split.running_var)
    bn.eval()
    torch.testing.assert_close(split(x), bn(x))


def test_bn_splits_encoder_keeps_state_dict_names():
    plain = build_encoder("resnet18", num_classes=8)
    split = build_encoder("resnet18", num_classes=8, bn_splits=4)
    assert list(plain.state_dict()) == list(split.state_dict())
    assert sum(isinstance(m, SplitBatchNorm) for m in split.modules()) == 20


def test_small_stem_is_the_cifar_recipe():
    enc = functools.partial(build_encoder, "resnet50", small_stem=True)(num_classes=8)
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
    assert isinstance(enc.maxpool, nn.Identity)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_the_momentum_update_follows_the_models_dtype_after_a_conversion():
    # its workspace is made for the parameters' dtype and device; converted after a
    # step, the model must get k * m + q * (1 - m) in the new dtype, not the old one's
    model = make_moco(m=0.9)
    model._momentum_update_key_encoder()  # the workspace made, in float32
    model.double()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p) / 3)
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for pk, k0, q0 in zip(model.encoder_k.parameters(), k, q):
        assert pk.dtype == torch.float64
        assert torch.equal(pk, k0 * 0.9 + q0 * (1.0 - 0.9))
