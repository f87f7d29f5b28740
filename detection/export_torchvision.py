#!/usr/bin/env python
"""
Export the ResNet of a MoCo checkpoint as a torchvision state_dict, for fine-tuning
with torchvision or timm:

    python export_torchvision.py input.pth.tar resnet50_moco.pth

The file has no fc.* (MoCo's projection head is left out) unless the input is a
linear-classification file, whose classifier is kept. See detection/README.md.
"""

import os
import sys

# the repository root, so that this runs from the root and from inside detection/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detection.convert import get_args_parser, main  # noqa: E402
from moco.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main, get_args_parser("torchvision"))
