"""
The original MoCo, written out again from facebookresearch/moco (moco/builder.py and
main_moco.py's training step) and, for the symmetric loss, from its official CIFAR-10
demo (colab/moco_cifar10_demo.ipynb): the reference the tests hold moco/builder.py and
main_moco.train_step to, bit for bit, and variant (o) of bench/step.py.

It shares nothing with moco/ or the programs (torch alone). What differs from the
original is only what a machine without a GPU needs: tensors stay on their inputs'
device instead of `.cuda()`, and one process without a process group runs as a group
of one would (the original refuses to run without DistributedDataParallel).
"""

import copy

import torch
import torch.distributed as dist
import torch.nn as nn


class OriginalMoCo(nn.Module):
    """The original's MoCo: a query encoder, a momentum key encoder and a queue."""

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False):
        super().__init__()
        self.K = K
        self.m = m
        self.T = T

        # the two encoders are drawn one after the other: the key encoder's own
        # initial weights are thrown away by the copy below, but its draws count
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)

        if mlp:  # fc becomes Linear(dim_mlp, dim_mlp), ReLU, then the old fc
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(
                nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc
            )
            self.encoder_k.fc = nn.Sequential(
                nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc
            )

        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters()
        ):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

        # drawn after both encoders; the buffer is then replaced by its normalised copy
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = nn.functional.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        # a new tensor for every parameter, bound to .data
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters()
        ):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # the original's simplification
        # the oldest keys are overwritten: a slice of batch_size columns at ptr
        self.queue[:, ptr : ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K
        self.queue_ptr[0] = ptr

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        # every process gathers every image, draws a permutation, uses process 0's
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        batch_size_all = x_gather.shape[0]
        num_gpus = batch_size_all // batch_size_this

        idx_shuffle = torch.randperm(batch_size_all).to(x.device)
        if dist.is_initialized():
            dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)

        idx_this = idx_shuffle.view(num_gpus, -1)[_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        batch_size_all = x_gather.shape[0]
        num_gpus = batch_size_all // batch_size_this
        idx_this = idx_unshuffle.view(num_gpus, -1)[_rank()]
        return x_gather[idx_this]

    def forward(self, im_q, im_k):
        """The original's order: queries, then (without grad) the momentum update,
        shuffle, keys, unshuffle; logits; enqueue. Returns (logits, labels)."""
        if getattr(self, "symmetric", False):
            raise NotImplementedError(
                "the original has no symmetric loss; the CIFAR-10 demo's is "
                "symmetric_loss"
            )
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)  # NxC

        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = nn.functional.normalize(self.encoder_k(im_k), dim=1)  # NxC
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)

        logits = original_logits(q, k, self.queue, self.T)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels

    # ------------------------------------------------------------ the CIFAR-10 demo's
    @torch.no_grad()
    def _batch_shuffle_single_gpu(self, x):
        idx_shuffle = torch.randperm(x.shape[0]).to(x.device)
        return x[idx_shuffle], torch.argsort(idx_shuffle)

    def _contrastive_loss(self, im_q, im_k):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            im_k_, idx_unshuffle = self._batch_shuffle_single_gpu(im_k)
            k = nn.functional.normalize(self.encoder_k(im_k_), dim=1)
            k = k[idx_unshuffle]
        logits = original_logits(q, k, self.queue, self.T)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return nn.CrossEntropyLoss()(logits, labels), k

    def symmetric_loss(self, im_1, im_2):
        """The demo's forward with symmetric=True (one process): each crop is once the
        query; the loss is the sum of the two directions' mean losses; both keys are
        enqueued in one slice, im_1's first."""
        with torch.no_grad():
            self._momentum_update_key_encoder()
        loss_12, k_2 = self._contrastive_loss(im_1, im_2)
        loss_21, k_1 = self._contrastive_loss(im_2, im_1)
        # the demo's enqueue gathers nothing; with one process the gather is a copy
        self._dequeue_and_enqueue(torch.cat([k_1, k_2], dim=0))
        return loss_12 + loss_21


def original_logits(q, k, queue, T):
    """[l_pos, l_neg] / T: Nx(1+K), the positive in column 0, as einsum products."""
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # Nx1
    l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])  # NxK
    logits = torch.cat([l_pos, l_neg], dim=1)
    logits /= T
    return logits


def original_step(model, criterion, optimizer, im_q, im_k):
    """The body of the original's train loop: returns (logits, loss)."""
    output, target = model(im_q=im_q, im_k=im_k)
    loss = criterion(output, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return output, loss


def demo_symmetric_step(model, optimizer, im_1, im_2):
    """The body of the CIFAR-10 demo's train loop with the symmetric loss."""
    loss = model.symmetric_loss(im_1, im_2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def original_optimizer(model, lr, momentum, weight_decay):
    """The original's SGD: one group over model.parameters(), the key encoder's too."""
    return torch.optim.SGD(
        model.parameters(), lr, momentum=momentum, weight_decay=weight_decay
    )


@torch.no_grad()
def concat_all_gather(tensor):
    """Every process's `tensor`, concatenated along dim 0 (no gradient)."""
    if not dist.is_initialized():
        return torch.cat([tensor], dim=0)  # a group of one gathers a copy
    tensors_gather = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(tensors_gather, tensor, async_op=False)
    return torch.cat(tensors_gather, dim=0)


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def original_copy(model):
    """An OriginalMoCo computing from a copy of `model`'s state (weights, queue,
    pointer, m, T): the original's code on the project's numbers, for comparing one
    private step at a time."""
    ref = copy.deepcopy(model)
    ref.__class__ = OriginalMoCo
    return ref
