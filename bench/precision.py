#!/usr/bin/env python
"""float32 against bfloat16 autocast: one training step each, interleaved, medians.

    python bench/precision.py                                   # this CPU as it is
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/precision.py

The model is the CIFAR-10 recipe's (ResNet-18 with the small stem, 32 px, 8 BatchNorm
groups, K 4096), stepped by main_moco.train_step on random images.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_moco  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--batch-size", default=64, type=int)
    parser.add_argument(
        "--rounds", default=8, type=int, help="steps of each, 2 untimed"
    )
    args = parser.parse_args()
    moco_args = main_moco.get_args_parser().parse_args(
        "x -a resnet18 --small-stem --input-size 32 --bn-splits 8 --moco-k 4096 "
        f"--moco-m 0.99 --moco-t 0.1 -b {args.batch_size}".split()
    )
    torch.manual_seed(0)
    model = main_moco.create_model(moco_args, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = torch.nn.CrossEntropyLoss()
    images = [torch.randn(args.batch_size, 3, 32, 32) for _ in range(2)]
    autocast = {
        "float32": torch.autocast("cpu", enabled=False),
        "bfloat16": torch.autocast("cpu", dtype=torch.bfloat16),
    }
    times: dict[str, list[float]] = {k: [] for k in autocast}
    for r in range(args.rounds):
        # each first as often as second
        for name in list(autocast)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            main_moco.train_step(
                model,
                criterion,
                optimizer,
                *images,
                scaler=scaler,
                autocast=autocast[name],
            )
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native bfloat16 "
        f"{main_moco.cpu_has_native_bfloat16()}: float32 {medians['float32']:.2f} s, "
        f"bfloat16 {medians['bfloat16']:.2f} s a step, ratio "
        f"{medians['bfloat16'] / medians['float32']:.2f}"
    )


if __name__ == "__main__":
    main()
