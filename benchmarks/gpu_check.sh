#!/usr/bin/env bash
# The GPU check: one command, one table, under 8 minutes on one GPU after `make install`.
# What it measures, and the targets: benchmarks/gpu_check.py. Arguments are passed on to it
# (for example --peak-tflops 989 for a GPU its table lacks, or --skip training).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "gpu_check: no $PY here: run 'make install' first" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') sees no GPU;" \
         "on a GPU machine 'make install' installs a CUDA build (TORCH_INDEX_URL picks another)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout --signal=INT 470 "$PY" benchmarks/gpu_check.py "$@"
