"""Weighted kNN classification on frozen features, as the monitor of the CIFAR-10 demo.

The memory bank is the L2-normalised features of DATA/train, the queries those of
DATA/val, both under the validation transform. Features: the backbone's (the encoder
without its head: what the linear probe and detection use) or the head's output (the
space of the contrastive loss: the CIFAR-10 demo's monitor).
Each query is given the class with the largest sum of exp(similarity / t) over its k
most similar bank samples (cosine similarity), as InstDisc
https://arxiv.org/abs/1805.01978.

Exact with any number of processes: each process extracts the features of its own
contiguous share of both sets (every sample once), keeps its share of the bank, and
the k nearest neighbours of every query are merged across processes. Equal
similarities go to the lower bank index, equal class scores to the lower class, so
neither the number of processes nor the chunk sizes that bound memory change the
result (beyond the rounding of a matrix product of another shape).

The command line is main_knn.py.
"""

import copy
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.datasets import ImageFolder

from moco.data import SeededImageFolder, check_val_folder, load_image
from moco.distributed import DistEnv, get_world_size
from moco.features import Features, backbone, extract
from moco.loader import eval_transforms
from moco.utils import UsageError, logger

# similarities computed at once, bounding memory: 2**24 float32 values are 64 MiB
MAX_SIMILARITIES = 2**24
QUERY_CHUNK = 1024
FEATURES = ("backbone", "head")
CROPS = ("center", "none")


def check_knn_data(data_dir: str, size: int | None = None) -> int:
    """
    DATA/val (the queries) with the classes of DATA/train (the memory bank; its images
    are checked by the caller). With `size` (--knn-crop none: images as they are), the
    first image of each split must be size x size. Returns the number of query images.
    """
    val = os.path.join(data_dir, "val")
    if not os.path.isdir(val):
        raise UsageError(
            f"kNN evaluation needs {val!r} (the queries; DATA/train is the memory "
            "bank): add a val folder with the classes of train"
        )
    n = check_val_folder(data_dir)
    for split in ("train", "val") if size else ():
        path, _ = ImageFolder(os.path.join(data_dir, split)).samples[0]
        found = load_image(path).size
        if found != (size, size):
            raise UsageError(
                f"--knn-crop none takes the images as they are, but {path!r} is "
                f"{found[0]}x{found[1]}, not {size}x{size} (--input-size): use "
                "--knn-crop center"
            )
    return n


def feature_extractor(encoder: nn.Module, features: str = "backbone") -> nn.Module:
    """
    An eval-mode copy of `encoder` whose output is the kNN features: "backbone" drops
    the head, "head" keeps it (the projection the contrastive loss sees).
    """
    if features == "head":
        return copy.deepcopy(encoder).eval()
    return backbone(encoder)


def _best_first(sims, index):
    """Order each row by similarity, descending, ties by bank index, ascending."""
    index, order = index.sort(dim=1)
    sims = sims.gather(1, order)
    sims, order = sims.sort(dim=1, descending=True, stable=True)
    return sims, index.gather(1, order)


def _topk(sims, k):
    """The k largest of each row of [B, M] `sims` and their columns, ties to the lower."""
    k = min(k, sims.shape[1])
    values, columns = sims.topk(k, dim=1)
    # torch.topk picks any of equal values: where the k-th value recurs outside the
    # selection, take the first columns of a stable sort instead
    ambiguous = (sims >= values[:, -1:]).sum(dim=1) > k
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        v, c = sims[rows].sort(dim=1, descending=True, stable=True)
        values[rows], columns[rows] = v[:, :k], c[:, :k]
    return _best_first(values, columns)


def _merge(a, b, k):
    """The k best of two (similarities, bank indices) candidate lists, [B, *] each."""
    sims, index = _best_first(torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1))
    return sims[:, :k], index[:, :k]


def knn_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    offset: int = 0,
    bank_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The k most similar rows of `bank` [N, D] for each of `queries` [B, D], best first:
    similarities and bank indices (+ offset), [B, min(k, N)] each. The bank is taken
    `bank_chunk` rows at a time (default: as many as MAX_SIMILARITIES allows).
    """
    if bank_chunk is None:
        bank_chunk = max(MAX_SIMILARITIES // max(queries.shape[0], 1), 1)
    best = (
        queries.new_zeros(queries.shape[0], 0),
        torch.zeros(queries.shape[0], 0, dtype=torch.long, device=queries.device),
    )
    for start in range(0, bank.shape[0], bank_chunk):
        sims = queries @ bank[start : start + bank_chunk].T  # cosine similarity: BxM
        values, columns = _topk(sims, k)
        best = _merge(best, (values, columns + offset + start), k)
    return best


def knn_vote(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float
) -> torch.Tensor:
    """Class scores [B, C]: the sum of exp(similarity / t) over a class's neighbours."""
    weights = (sims / t).exp()
    scores = weights.new_zeros(sims.shape[0], num_classes)
    # one neighbour at a time: the same sums in the same order on every device
    for j in range(sims.shape[1]):
        scores.scatter_add_(1, labels[:, j : j + 1], weights[:, j : j + 1])
    return scores


def rank_classes(scores: torch.Tensor) -> torch.Tensor:
    """Classes from the most to the least likely; of equal scores the lower class first."""
    return scores.sort(dim=1, descending=True, stable=True)[1]


def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    query_chunk: int = QUERY_CHUNK,
    bank_chunk: int | None = None,
) -> torch.Tensor:
    """
    Weighted kNN on one process: `features` [B, D] and `bank` [N, D] L2-normalised,
    `bank_labels` [N]. Returns the classes ranked for each query, [B, C] (column 0 is
    the prediction). Queries are taken `query_chunk` at a time.
    """
    ranked = []
    for start in range(0, features.shape[0], query_chunk):
        sims, index = knn_topk(
            features[start : start + query_chunk], bank, k, 0, bank_chunk
        )
        ranked.append(rank_classes(knn_vote(sims, bank_labels[index], num_classes, t)))
    if not ranked:
        return torch.zeros(0, num_classes, dtype=torch.long, device=features.device)
    return torch.cat(ranked)


def knn_top1(
    queries: Features, bank: Features, num_classes: int, k: int, t: float
) -> float:
    """
    Top-1 accuracy (percent) of the kNN classifier, on L2-normalised features.
    Collective: every process holds all `queries` and its share of the `bank` (with
    the labels of the whole bank), and gets the same figure.
    """
    bank_labels = bank.y
    k = min(k, bank_labels.shape[0])
    world_size = get_world_size()
    correct = 0
    for start in range(0, queries.x.shape[0], QUERY_CHUNK):
        chunk = queries.x[start : start + QUERY_CHUNK]
        sims, index = knn_topk(chunk, bank.x, k, bank.start)
        if world_size > 1:
            # pad to k candidates (a share may hold fewer samples); padding never wins
            pad = k - sims.shape[1]
            sims = F.pad(sims, (0, pad), value=float("-inf"))
            index = F.pad(index, (0, pad), value=bank_labels.shape[0])
            all_sims = [torch.empty_like(sims) for _ in range(world_size)]
            all_index = [torch.empty_like(index) for _ in range(world_size)]
            dist.all_gather(all_sims, sims)
            dist.all_gather(all_index, index)
            sims, index = _best_first(torch.cat(all_sims, 1), torch.cat(all_index, 1))
            sims, index = sims[:, :k], index[:, :k]
        scores = knn_vote(sims, bank_labels[index], num_classes, t)
        pred = rank_classes(scores)[:, 0]
        correct += int((pred == queries.y[start : start + QUERY_CHUNK]).sum())
    return 100.0 * correct / max(queries.x.shape[0], 1)


@dataclass(frozen=True)
class KnnOptions:
    """What the kNN classifier is given (moco.cli.add_knn_arguments)."""

    k: int = 200
    t: float = 0.1
    features: str = "backbone"
    crop: str = "center"
    normalize: str = "imagenet"
    input_size: int = 224

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise UsageError(f"--knn-k must be positive, got {self.k}")
        if self.t <= 0:
            raise UsageError(f"--knn-t must be positive, got {self.t}")


def knn_accuracy(
    encoder: nn.Module,
    data_dir: str,
    env: DistEnv,
    options: KnnOptions,
    batch_size: int,
    workers: int,
    skip_bad: bool = False,
) -> float:
    """
    kNN top-1 accuracy (percent) of `encoder`'s features (see feature_extractor): memory
    bank DATA/train, queries DATA/val, under the validation transform (see
    moco.loader.eval_transforms); batch_size and workers are this process's.
    Collective: call it on every process; each gets the same figure.
    """
    start_time = time.time()
    model = feature_extractor(encoder, options.features).to(env.device)
    center_crop = options.crop == "center"
    transform = eval_transforms(options.input_size, options.normalize, center_crop)[1]
    bank_set = SeededImageFolder(
        os.path.join(data_dir, "train"), transform, skip_bad=skip_bad
    )
    # every query counts: an unreadable one is an error, not skipped
    query_set = SeededImageFolder(os.path.join(data_dir, "val"), transform)

    # each process keeps its share of the bank and searches it for every query
    bank = extract(
        model, bank_set, env, batch_size, workers, everywhere=False, normalize=True
    )
    queries = extract(model, query_set, env, batch_size, workers, normalize=True)
    del model
    acc = knn_top1(queries, bank, len(bank_set.classes), options.k, options.t)
    logger.info(
        f"=> kNN: {bank.y.shape[0]} bank and {queries.y.shape[0]} query images, "
        f"{bank.x.shape[1]}-d {options.features} features, "
        f"{time.time() - start_time:.1f} s"
    )
    return acc
