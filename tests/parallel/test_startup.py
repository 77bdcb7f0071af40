"""A process killed while DeepSpeed loads its CPU comm op must not hang every later start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_moe.parallel.startup import use_environment_extension_dir

REPO = Path(__file__).resolve().parents[2]

START = """
import os
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
from sparse_moe.parallel.startup import init_deepspeed_distributed
init_deepspeed_distributed("gloo")
import torch.distributed as dist
print("started", dist.get_world_size())
"""


def _baton() -> Path | None:
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    use_environment_extension_dir()  # where the started process will build and look
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    return None if builder is None else Path(_get_build_directory(builder.name, False)) / "lock"


@pytest.mark.timeout(240)
def test_start_succeeds_despite_a_stale_extension_lock(tmp_path):
    baton = _baton()
    assert baton is not None, "DeepSpeed has no CPU shared-memory comm op builder here"
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.touch()  # what a process killed inside torch's JIT load leaves behind
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True,
                          timeout=200, cwd=REPO, env=dict(os.environ, PORT=str(port)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started 1" in proc.stdout
    assert not baton.exists()


def test_ops_build_inside_the_virtual_environment(monkeypatch):
    """Two environments sharing torch's ~/.cache default rebuild the op for each other."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", "/envs/a")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    use_environment_extension_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/envs/a/torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    use_environment_extension_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/chosen"  # an explicit choice wins


def test_the_environments_ninja_builds_every_op(monkeypatch, tmp_path):
    """Two ninja versions on one machine rebuild each other's builds: the environment's wins."""
    from sparse_moe.parallel import startup

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    monkeypatch.setattr(startup.sys, "prefix", str(env))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    startup.use_environment_ninja()
    assert os.environ["PATH"] == "/usr/bin:/bin"  # no ninja in the environment: left alone
    (env / "bin" / "ninja").write_text("")
    startup.use_environment_ninja()
    startup.use_environment_ninja()
    assert os.environ["PATH"] == f"{env / 'bin'}:/usr/bin:/bin"  # first, once
