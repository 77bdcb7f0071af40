"""FactoredAdam and the schedule as DeepSpeed's client optimizer and scheduler (1 CPU rank)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_ds_client_optimizer.py")


def _run(stage: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(stage)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_engine_trains_with_factored_adam_and_schedule():
    result = _run(stage=0)
    losses = result["losses"]
    assert losses[-1] < 0.8 * losses[0]
    # The engine steps the LambdaLR once per update: after update n the factor is that of
    # update n + 1 (warmup 2, no hold): 1, sqrt(2/3), sqrt(2/4), ...
    expected = [0.01 * min(1.0, math.sqrt(2 / (n + 1))) for n in range(1, 16)]
    assert result["lrs"] == pytest.approx(expected)
    # Without ZeRO the optimizer sees real shapes and keeps factored statistics.
    assert {"row", "col"} <= set(result["state_keys"])
