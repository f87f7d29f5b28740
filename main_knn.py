#!/usr/bin/env python
"""Weighted kNN accuracy of an encoder: DIR/train is the memory bank, DIR/val the queries.

    python main_knn.py -a resnet50 --pretrained [your checkpoint path]/checkpoint_0199.pth.tar \
      [your imagenet-folder with train and val folders]

Without --pretrained it measures a randomly initialised encoder, the baseline. Runs in
the launch modes of main_moco.py (see README.md); the figure is exact in every one.
"""

import argparse

import torch

from moco.cli import (
    add_data_arguments,
    add_image_arguments,
    add_knn_arguments,
    add_launch_arguments,
    check_ranges,
    knn_options,
    launch_settings,
    run_cli,
)
from moco.data import require_labels
from moco.distributed import cleanup, init_distributed, launch, shared_seed
from moco.knn import check_knn_data, knn_accuracy
from moco.models import build_encoder, check_arch
from moco.utils import UsageError, logger
from moco.weights import load_encoder, load_encoder_with_head


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Weighted kNN accuracy of an encoder's features: DIR/train is the "
        "memory bank, DIR/val the queries"
    )
    add_data_arguments(parser, "images per forward pass of the node (default: 256)")
    parser.add_argument(
        "--pretrained",
        default="",
        metavar="PATH",
        help="checkpoint of any kind main_lincls.py accepts (default: none, a randomly "
        "initialised encoder: the baseline)",
    )
    parser.add_argument(
        "--seed",
        default=None,
        type=int,
        help="seed of the random initialisation without --pretrained",
    )
    add_launch_arguments(parser)
    add_image_arguments(parser)
    add_knn_arguments(parser.add_argument_group("kNN"))
    return parser


def check_args(args):
    check_ranges(
        positive={"-b/--batch-size": args.batch_size, "--input-size": args.input_size},
        non_negative={"-j/--workers": args.workers},
    )
    # refuses a --knn-k or --knn-t out of range
    knn_options(args)
    if args.knn_features == "head" and not args.pretrained:
        raise UsageError(
            "--knn-features head needs --pretrained (a MoCo checkpoint with its head); "
            "measure a random encoder on its backbone features"
        )
    check_arch(args.arch, small_stem=args.small_stem)
    launch_settings(args).check(args.batch_size)


def create_model(args):
    """The encoder of --pretrained (with its head for --knn-features head), or a random one."""
    if args.knn_features == "head":
        return load_encoder_with_head(args.pretrained, args.arch, args.small_stem)
    model = build_encoder(args.arch, small_stem=args.small_stem)
    if args.pretrained:
        load_encoder(model, args.pretrained, args.arch)
    return model


def main(args):
    check_args(args)
    if args.pretrained:
        # refuse a wrong file before reading any data
        create_model(args)
    require_labels(args.data, "main_knn.py (kNN evaluation)")
    check_knn_data(args.data, args.input_size if args.knn_crop == "none" else None)
    return launch(main_worker, launch_settings(args), args)


def main_worker(local_rank, procs_per_node, args):
    env = init_distributed(local_rank, procs_per_node, launch_settings(args))
    try:
        # without --pretrained every process needs the same random weights
        torch.manual_seed(shared_seed(args.seed))
        model = create_model(args).to(env.device)
        what = f"'{args.pretrained}'" if args.pretrained else f"a random {args.arch}"
        logger.info(f"=> kNN evaluation of {what} (k {args.knn_k}, t {args.knn_t})")
        batch_size, workers = env.per_process(args.batch_size, args.workers)
        options = knn_options(args)
        acc = knn_accuracy(model, args.data, env, options, batch_size, workers)
        logger.info(f" * kNN Acc@1 {acc:.2f}")
        return acc
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
