#!/usr/bin/env python
"""
Convert a MoCo checkpoint into detectron2's weight format:

    python convert-pretrain-to-detectron2.py input.pth.tar output.pkl

See detection/README.md; the conversion itself lives in detection/convert.py.
"""

import os
import sys

# the repository root, so that this runs from the root and from inside detection/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detection.convert import get_args_parser, main  # noqa: E402
from moco.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main, get_args_parser("detectron2"))
