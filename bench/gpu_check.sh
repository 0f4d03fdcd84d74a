#!/usr/bin/env sh
# The GPU check (bench/gpu.py) with the hub kept offline; figures go to gpu_check.json beside the log.
# Usage, from the repository root on a CUDA machine: sh bench/gpu_check.sh [python]
set -eu
PYTHON="${1:-.venv/bin/python}"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PYTHON" -m server.bench gpu --json | tee gpu_check.log
tail -n 1 gpu_check.log > gpu_check.json
