"""
The original's formulas (facebookresearch/moco's builder), written out plainly: the
reference the tests hold moco/builder.py to, bit for bit, and variant (o) of
bench/step.py, which imports it from here.
"""

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moco.builder import MoCo, concat_all_gather, world_size_and_rank


def original_logits(q, k, queue, T):
    """einsum products, the positive first, divided by T."""
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1)
    logits /= T
    return logits


class OriginalMoCo(MoCo):
    """MoCo with the original's formulas wherever this project computes differently."""

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        # new tensors every step, bound to .data
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters()
        ):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        # every image of the global batch to every process, then each takes its share
        world_size, rank = world_size_and_rank()
        x_all = concat_all_gather(x)
        idx_shuffle = torch.randperm(x_all.shape[0]).to(x.device)
        if world_size > 1:
            dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        return x_all[idx_shuffle.view(world_size, -1)[rank]], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        world_size, rank = world_size_and_rank()
        return concat_all_gather(x)[idx_unshuffle.view(world_size, -1)[rank]]

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        # a host read (a GPU sync) every step
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def _contrast(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)
        return original_logits(q, k, self.queue, self.T), k


def original_copy(model):
    """A deep copy of a MoCo model that computes with the original's formulas."""
    ref = copy.deepcopy(model)
    ref.__class__ = OriginalMoCo
    return ref
