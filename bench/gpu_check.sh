#!/usr/bin/env bash
# One check of the project on a machine with one CUDA GPU, from a fresh copy of the
# repository, in 8 minutes: set-up, the cuda tests, the step and loader benchmarks and a
# short CIFAR-10 run, as one table (see bench/gpu_check.py --help).
#
#   bash bench/gpu_check.sh                                  # on the GPU machine
#   bash bench/gpu_check.sh --cifar PATH/cifar10-jpeg.tar.gz --out report.json
#   bash bench/gpu_check.sh --dry-run                        # toy sizes on the CPU
#
# PYTHON (default python3) runs the script, which makes or reuses .venv for the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
