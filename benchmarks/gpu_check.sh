#!/usr/bin/env bash
# The GPU check: one command, one table, under 8 minutes on one GPU after `make install`.
# What it measures, and the targets: benchmarks/gpu_check.py. Arguments are passed on to it
# (for example --peak-tflops 989 for a GPU its table lacks, or --skip training).
# PYTHON=... uses another interpreter than the checkout's .venv (a cluster's CUDA environment
# holding the packages of requirements.txt); the checkout's sources are put on its path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
if ! command -v "$PY" >/dev/null; then
    echo "gpu_check: no $PY here: run 'make install' first, or set PYTHON" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') sees no GPU;" \
         "on a GPU machine 'make install' installs a CUDA build (TORCH_INDEX_URL picks another)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout --signal=INT 470 "$PY" benchmarks/gpu_check.py "$@"
