"""Weighted kNN classification on frozen features, as the monitor of the CIFAR-10 demo.

The memory bank is the L2-normalised backbone features (the encoder without its head)
of DATA/train, the queries those of DATA/val, both under the validation transform.
Each query is given the class with the largest sum of exp(similarity / t) over its k
most similar bank samples (cosine similarity), as InstDisc
https://arxiv.org/abs/1805.01978.

Exact with any number of processes: each process extracts the features of its own
contiguous share of both sets (every sample once), keeps its share of the bank, and
the k nearest neighbours of every query are merged across processes. Equal
similarities go to the lower bank index, equal class scores to the lower class, so
neither the number of processes nor the chunk sizes that bound memory change the
result (beyond the rounding of a matrix product of another shape).

    python -m moco.knn -a resnet50 --pretrained CHECKPOINT [imagenet-folder]
"""

import argparse
import copy
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from moco.checkpoint import load_encoder
from moco.data import SeededImageFolder, check_image_folder, check_val_folder
from moco.distributed import (
    all_gather_rows,
    broadcast_object,
    check_launch_args,
    cleanup,
    get_world_size,
    init_distributed,
    launch,
    shard_range,
)
from moco.loader import eval_transforms
from moco.models import build_encoder, check_arch, model_names
from moco.utils import UsageError, logger, run_cli, setup_logging

# similarities computed at once, bounding memory: 2**24 float32 values are 64 MiB
MAX_SIMILARITIES = 2**24
QUERY_CHUNK = 1024
HEADS = ("fc", "classifier", "heads", "head")  # torchvision's names of the last layers


def check_knn_data(data_dir):
    """
    DATA/val (the queries) with the classes of DATA/train (the memory bank; its images
    are checked by the caller). Returns the number of query images.
    """
    val = os.path.join(data_dir, "val")
    if not os.path.isdir(val):
        raise UsageError(
            f"kNN evaluation needs {val!r} (the queries; DATA/train is the memory "
            "bank): add a val folder with the classes of train"
        )
    return check_val_folder(data_dir)


def backbone(encoder):
    """A copy of `encoder` without its head, in eval mode: its output is the features."""
    model = copy.deepcopy(encoder)  # of a torch.compile'd module: an eager copy
    for name in HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
            return model.eval()
    raise UsageError(
        f"cannot find the head of {type(encoder).__name__} (one of {HEADS})"
    )


@torch.no_grad()
def extract_features(model, loader, device):
    """L2-normalised outputs of `model` and the labels over `loader`: [N, D], [N]."""
    model.eval()
    features, labels = [], []
    for images, target in loader:
        out = model(images.to(device, non_blocking=True)).flatten(1).float()
        features.append(F.normalize(out, dim=1))
        labels.append(target.to(device))
    if not features:  # a process without a share of a tiny set: [0, D] all the same
        dataset = getattr(loader.dataset, "dataset", loader.dataset)  # under a Subset
        dim = model(dataset[0][0].unsqueeze(0).to(device)).flatten(1).shape[1]
        features = [torch.zeros(0, dim, device=device)]
        labels = [torch.zeros(0, dtype=torch.long, device=device)]
    return torch.cat(features), torch.cat(labels)


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


def knn_topk(queries, bank, k, offset=0, bank_chunk=None):
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


def knn_vote(sims, labels, num_classes, t):
    """Class scores [B, C]: the sum of exp(similarity / t) over a class's neighbours."""
    weights = (sims / t).exp()
    scores = weights.new_zeros(sims.shape[0], num_classes)
    # one neighbour at a time: the same sums in the same order on every device
    for j in range(sims.shape[1]):
        scores.scatter_add_(1, labels[:, j : j + 1], weights[:, j : j + 1])
    return scores


def rank_classes(scores):
    """Classes from the most to the least likely; of equal scores the lower class first."""
    return scores.sort(dim=1, descending=True, stable=True)[1]


def knn_predict(
    features,
    bank,
    bank_labels,
    num_classes,
    k=200,
    t=0.1,
    query_chunk=QUERY_CHUNK,
    bank_chunk=None,
):
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


def knn_accuracy(queries, query_labels, bank, offset, bank_labels, num_classes, k, t):
    """
    Top-1 accuracy (percent) of the kNN classifier; collective: every process holds all
    `queries`, its share of `bank` (starting at global index `offset`) and all
    `bank_labels`, and gets the same figure.
    """
    k = min(k, bank_labels.shape[0])
    world_size = get_world_size()
    correct = 0
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        sims, index = knn_topk(chunk, bank, k, offset)
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
        correct += int((pred == query_labels[start : start + QUERY_CHUNK]).sum())
    return 100.0 * correct / max(queries.shape[0], 1)


def _share_loader(dataset, env, batch_size, workers):
    """This process's contiguous share of `dataset`, in order."""
    share = Subset(dataset, shard_range(len(dataset), env.rank, env.world_size))
    return DataLoader(
        share,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
    )


def knn_monitor_accuracy(encoder, args, env):
    """
    kNN top-1 accuracy (percent) of `encoder`'s backbone features: memory bank
    DATA/train, queries DATA/val, under the validation transform. Collective: call it
    on every process; each gets the same figure. Uses args.data, args.knn_k, args.knn_t,
    args.input_size, args.workers and args.batch_size (of the node, as -b).
    """
    start_time = time.time()
    model = backbone(encoder).to(env.device)
    transform = eval_transforms(args.input_size)[1]
    batch_size = max(args.batch_size // env.procs_per_node, 1)
    workers = (args.workers + env.procs_per_node - 1) // env.procs_per_node
    skip_bad = getattr(args, "skip_bad_images", False)  # main_moco.py's option
    bank_set = SeededImageFolder(
        os.path.join(args.data, "train"), transform, skip_bad=skip_bad
    )
    query_set = SeededImageFolder(
        os.path.join(args.data, "val"), transform, skip_bad=skip_bad
    )

    bank, bank_labels = extract_features(
        model, _share_loader(bank_set, env, batch_size, workers), env.device
    )
    queries, query_labels = extract_features(
        model, _share_loader(query_set, env, batch_size, workers), env.device
    )
    del model
    offset = shard_range(len(bank_set), env.rank, env.world_size).start
    bank_labels = all_gather_rows(bank_labels)
    queries, query_labels = all_gather_rows(queries), all_gather_rows(query_labels)
    acc = knn_accuracy(
        queries,
        query_labels,
        bank,
        offset,
        bank_labels,
        len(bank_set.classes),
        args.knn_k,
        args.knn_t,
    )
    logger.info(
        f"=> kNN: {bank_labels.shape[0]} bank and {queries.shape[0]} query images, "
        f"{bank.shape[1]}-d features, {time.time() - start_time:.1f} s"
    )
    return acc


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Weighted kNN accuracy of an encoder's backbone features: "
        "DIR/train is the memory bank, DIR/val the queries"
    )
    # fmt: off
    parser.add_argument("data", metavar="DIR", help="path to dataset (DIR/train, DIR/val)")
    parser.add_argument(
        "-a", "--arch", metavar="ARCH", default="resnet50",
        help="model architecture: " + " | ".join(model_names()) + " (default: resnet50)",
    )
    parser.add_argument("--pretrained", default="", metavar="PATH",
                        help="checkpoint of any kind main_lincls.py accepts (default: none, "
                        "a randomly initialised encoder: the baseline)")
    parser.add_argument("--knn-k", default=200, type=int, help="number of neighbours (200)")
    parser.add_argument("--knn-t", default=0.1, type=float, help="temperature (0.1)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="images per forward pass of the node (default: 256)")
    parser.add_argument("-j", "--workers", default=32, type=int, metavar="N",
                        help="number of data loading workers of the node (default: 32)")
    parser.add_argument("--input-size", default=224, type=int, metavar="PX",
                        help="crop size in pixels (default: 224)")
    parser.add_argument("--small-stem", action="store_true",
                        help="ResNet stem for small images (for encoders pretrained with it)")
    parser.add_argument("--seed", default=None, type=int,
                        help="seed of the random initialisation without --pretrained")
    parser.add_argument("--gpu", default=None, type=int, help="GPU id to use.")
    parser.add_argument("--multiprocessing-distributed", action="store_true",
                        help="one process per GPU (or --procs-per-node) on each node")
    parser.add_argument("--procs-per-node", default=0, type=int, metavar="N",
                        help="processes per node with --multiprocessing-distributed")
    parser.add_argument("--world-size", default=-1, type=int, help="number of nodes")
    parser.add_argument("--rank", default=-1, type=int, help="node rank")
    parser.add_argument("--dist-url", default="tcp://224.66.41.62:23456", type=str,
                        help="url used to set up distributed evaluation")
    parser.add_argument("--dist-backend", default="nccl", type=str,
                        help="distributed backend (gloo is used where there is no GPU)")
    parser.add_argument("--dist-timeout", default=1800, type=int, metavar="S",
                        help="seconds before a collective waiting on a dead process fails")
    # fmt: on
    return parser


def check_args(args):
    for name, value in {
        "--knn-k": args.knn_k,
        "-b/--batch-size": args.batch_size,
        "--input-size": args.input_size,
    }.items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    if args.knn_t <= 0:
        raise UsageError(f"--knn-t must be positive, got {args.knn_t}")
    if args.workers < 0:
        raise UsageError(f"-j/--workers must be zero or positive, got {args.workers}")
    check_arch(args.arch, small_stem=args.small_stem)
    check_launch_args(args)


def create_model(args):
    model = build_encoder(args.arch, small_stem=args.small_stem)
    if args.pretrained:
        load_encoder(model, args.pretrained, args.arch)
    return model


def main(args):
    check_args(args)
    if args.pretrained:
        create_model(args)  # refuse a wrong file before reading any data
    check_image_folder(os.path.join(args.data, "train"), "training data")
    check_knn_data(args.data)
    return launch(main_worker, args)


def main_worker(local_rank, procs_per_node, args):
    env = init_distributed(local_rank, procs_per_node, args)
    setup_logging(env.rank)
    try:
        # without --pretrained every process needs the same random weights
        seed = args.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        torch.manual_seed(broadcast_object(seed))
        model = create_model(args).to(env.device)
        what = f"'{args.pretrained}'" if args.pretrained else f"a random {args.arch}"
        logger.info(f"=> kNN evaluation of {what} (k {args.knn_k}, t {args.knn_t})")
        acc = knn_monitor_accuracy(model, args, env)
        logger.info(f" * kNN Acc@1 {acc:.2f}")
        return acc
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
