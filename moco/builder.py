"""MoCo: a query encoder, a momentum key encoder and a queue of keys.

MoCo v1: https://arxiv.org/abs/1911.05722
MoCo v2: https://arxiv.org/abs/2003.04297

This file depends on torch alone. It runs with or without a process group and on
any device: with one process the key shuffle stays within the batch.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


class MoCo(nn.Module):
    """
    Build a MoCo model with: a query encoder, a key encoder, and a queue
    https://arxiv.org/abs/1911.05722
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        symmetric: bool = False,
    ) -> None:
        """
        base_encoder: called as base_encoder(num_classes=dim), e.g. a torchvision ResNet
        dim: feature dimension (default: 128)
        K: queue size; number of negative keys (default: 65536)
        m: moco momentum of updating key encoder (default: 0.999)
        T: softmax temperature (default: 0.07)
        mlp: a 2-layer MLP head (MoCo v2) instead of one linear layer
        symmetric: each crop is used once as query and once as key (as in the official
            CIFAR-10 demo); logits and labels then hold both directions, 2N rows
        """
        super().__init__()

        self.K = K
        self.m = m
        self.T = T
        self.symmetric = symmetric

        # create the encoders; num_classes is the output fc dimension
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)

        if mlp:  # replace fc by fc(relu(linear)): names fc.0.* and fc.2.*
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
            param_k.data.copy_(param_q.data)  # initialize
            param_k.requires_grad = False  # not updated by gradient

        # create the queue: dim x K, one L2-normalised key per column
        self.register_buffer(
            "queue", nn.functional.normalize(torch.randn(dim, K), dim=0)
        )
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        self._scratch = None  # workspace of the momentum update, not part of the state

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """
        Momentum update of the key encoder: k = k * m + q * (1 - m). Only parameters:
        the key encoder keeps its own BatchNorm statistics.
        """
        params_q = list(self.encoder_q.parameters())
        params_k = list(self.encoder_k.parameters())
        # the original's `param_k.data = param_k.data * m + param_q.data * (1 - m)`,
        # in place: a workspace for q * (1 - m) gives the same numbers bit for bit
        # without two new tensors per parameter every step (an add with alpha would
        # round once, as a fused multiply-add, and differ)
        s = self._scratch
        if s is None or (s[0].device, s[0].dtype) != (
            params_q[0].device,
            params_q[0].dtype,
        ):
            self._scratch = [torch.empty_like(p) for p in params_q]
        torch._foreach_copy_(self._scratch, params_q)
        torch._foreach_mul_(self._scratch, 1.0 - self.m)
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, self._scratch)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """Replace the oldest keys by `keys` (this process's, NxC) of every process."""
        # gather keys before updating queue
        keys = concat_all_gather(keys)

        batch_size = keys.shape[0]
        assert batch_size <= self.K, "the queue must hold at least one global batch"

        # columns ptr, ptr + 1, ... wrapping around the end of the queue; when K is a
        # multiple of the batch this is the original's slice queue[:, ptr:ptr + B]
        idx = torch.arange(batch_size, device=keys.device).add_(self.queue_ptr)
        idx.remainder_(self.K)
        self.queue.index_copy_(1, idx, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(batch_size).remainder_(self.K)  # move pointer

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        """
        Batch shuffle across all processes, for making use of BatchNorm: the key
        encoder must not see which samples share its BatchNorm batch.
        Returns this process's shuffled images and the index restoring the order.
        """
        world_size, rank = world_size_and_rank()
        batch_size_this = x.shape[0]
        batch_size_all = batch_size_this * world_size

        # random shuffle index, drawn on the CPU by every process; process 0's is used
        idx_shuffle = to_device(torch.randperm(batch_size_all), x.device)
        if world_size > 1:
            dist.broadcast(idx_shuffle, src=0)

        # index for restoring
        idx_unshuffle = torch.argsort(idx_shuffle)

        # shuffled index for this process
        if world_size == 1:
            return x[idx_shuffle], idx_unshuffle
        return _rows_from_all(x, idx_shuffle, rank, world_size), idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        """Undo batch shuffle: this process's keys, in the order of its images."""
        world_size, rank = world_size_and_rank()

        # gathered from all processes
        x_gather = concat_all_gather(x)

        # restored index for this process
        idx_this = idx_unshuffle.view(world_size, -1)[rank]
        return x_gather[idx_this]

    def _contrast(self, im_q, im_k):
        """Logits of queries from im_q against their keys from im_k and the queue."""
        # compute query features: NxC; fp32 even when the encoder runs in lower precision
        q = nn.functional.normalize(self.encoder_q(im_q).float(), dim=1)

        # compute key features
        with torch.no_grad():  # no gradient to keys
            # shuffle for making use of BN
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)

            # keys: NxC
            k = nn.functional.normalize(self.encoder_k(im_k).float(), dim=1)

            # undo shuffle
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)

        # the logits, their softmax and the queue stay in fp32 under autocast
        with torch.autocast(q.device.type, enabled=False):
            # positive logits: Nx1
            l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
            # negative logits: NxK; a copy, since the enqueue below changes the queue
            # in place while backward still needs the keys the logits were made with
            l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])

            # logits: Nx(1+K), the positive at column 0
            logits = torch.cat([l_pos, l_neg], dim=1)

            # apply temperature
            logits /= self.T
        return logits, k

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Input:
            im_q: a batch of query images
            im_k: a batch of key images
        Output:
            logits, targets: Nx(1+K) logits and N zeros (the positive key's column);
            2N rows each when symmetric (queries from im_q first, then from im_k)
        """
        with torch.no_grad():
            self._momentum_update_key_encoder()  # update the key encoder

        if self.symmetric:
            logits_12, keys_2 = self._contrast(im_q, im_k)
            logits_21, keys_1 = self._contrast(im_k, im_q)
            logits = torch.cat([logits_12, logits_21], dim=0)
            keys: tuple[torch.Tensor, ...] = (keys_1, keys_2)
        else:
            logits, k = self._contrast(im_q, im_k)
            keys = (k,)

        # labels: positive key indicators
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

        # dequeue and enqueue, after the logits were computed
        for k in keys:
            self._dequeue_and_enqueue(k)

        return logits, labels


# utils
def world_size_and_rank() -> tuple[int, int]:
    """(world size, rank); (1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate `tensor` of every process along dim 0 (itself without a process group).
    *** Warning ***: torch.distributed.all_gather has no gradient.
    """
    world_size, _ = world_size_and_rank()
    if world_size == 1:
        return tensor
    tensors_gather = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(tensors_gather, tensor.contiguous())
    return torch.cat(tensors_gather, dim=0)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without making the host wait for the copy."""
    if device.type == "cuda":
        t = t.pin_memory()  # a non-blocking copy from pageable memory would wait
    return t.to(device, non_blocking=True)


@torch.no_grad()
def _rows_from_all(x, idx_shuffle, rank, world_size):
    """
    concat_all_gather(x)[idx_shuffle.view(world_size, -1)[rank]], moving only the rows
    each process needs (all_to_all) instead of every row to every process.
    Process r owns global rows r*n .. (r+1)*n - 1; idx_shuffle is the same everywhere.
    """
    n = x.shape[0]
    # all_to_all takes its split sizes on the host: the permutation's one trip there
    idx = idx_shuffle.cpu().view(world_size, n)
    owner = torch.div(idx, n, rounding_mode="floor")  # which process holds each row

    # to send: my rows that each process needs, in the order it needs them
    send_mask = owner == rank
    send_rows = idx[send_mask] - rank * n
    send_counts = send_mask.sum(dim=1).tolist()
    # to receive: the rows I need, grouped by the process that holds them
    my_owner = owner[rank]
    recv_counts = torch.bincount(my_owner, minlength=world_size).tolist()
    order = torch.argsort(my_owner, stable=True)

    # the collective moves contiguous rows; the result keeps x's memory format
    received = x.new_empty(x.shape)
    send = x[to_device(send_rows, x.device)].contiguous()
    dist.all_to_all_single(received, send, recv_counts, send_counts)
    out = torch.empty_like(x)
    out[to_device(order, x.device)] = received  # this process's shuffled order
    return out
