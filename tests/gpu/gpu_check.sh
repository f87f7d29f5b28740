#!/usr/bin/env bash
# The project checked on one CUDA GPU, from a fresh copy of the repository, in one call
# of 9 minutes: set-up, the cuda tests, the step and loader benchmarks and a CIFAR-10
# run of several epochs, as one table (see tests/gpu/check.py --help, docs/gpu_check.md).
#
#   bash tests/gpu/gpu_check.sh --cifar data/cifar10-jpeg.tar.gz   # on the GPU machine
#   bash tests/gpu/gpu_check.sh --dry-run                          # toy sizes on the CPU
#
# PYTHON (default python3) runs the check, which makes or reuses .venv for the rest.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tests/gpu/check.py "$@"
