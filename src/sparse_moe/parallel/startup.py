"""Starting DeepSpeed's communication backend safely on machines where processes get killed.

On CPU, DeepSpeed's ``TorchBackend`` loads its shared-memory collective op at every start
through torch's JIT extension loader, which holds a ``FileBaton``: a plain ``lock`` file in
the extension's build directory, removed when the load finishes. A process killed inside
that window (preemption, ``scancel``, a launcher tearing down a failed job, kill -9 tests)
leaves the file behind, and every later start then waits on it forever.

``init_deepspeed_distributed`` loads the op first while holding an ``fcntl`` lock, which the
kernel releases when its holder dies. Every start in this project goes through it, so while
the ``fcntl`` lock is held no other process can be inside the window and a leftover baton
is stale: it is removed. DeepSpeed caches loaded ops, so its own load then returns at once.

Inside a virtual environment the op is built under ``<venv>/torch_extensions`` unless
``TORCH_EXTENSIONS_DIR`` says otherwise: torch's shared default (``~/.cache``) holds one build
per op name, and two environments (two checkouts, a CI clone) would rebuild it for each
other at every start (about 90 s each).
"""

from __future__ import annotations

import fcntl
import os
import sys
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch.distributed as dist

from sparse_moe.parallel import deepspeed_internals as ds_internals

SHM_BUILDER = "ShareMemCommBuilder"


def _shm_builder():
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is None or not ds_internals.op_compatible(builder.NAME):
        return None
    return builder


def use_environment_extension_dir() -> None:
    """Builds JIT ops inside the active virtual environment, unless told otherwise."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def use_environment_ninja() -> None:
    """Puts the environment's ``ninja`` (installed with the requirements) first on ``PATH``.

    torch builds JIT ops with the first ``ninja`` on ``PATH``. Where the system has another
    version (1.11 beside pip's 1.13, say), the two write build logs the other does not read,
    and each rebuilds the op the other built (about 45 s): a job started with the environment
    activated (the Slurm templates) and one started without it (``.venv/bin/python``) rebuilt
    it for each other at every start. Every start here uses the environment's.
    """
    bin_dir = Path(sys.prefix) / "bin"
    path = os.environ.get("PATH", "")
    if (bin_dir / "ninja").exists() and path.split(os.pathsep)[0] != str(bin_dir):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{path}"


def load_deepspeed_comm_ops() -> None:
    """Loads DeepSpeed's CPU comm op under an fcntl lock, clearing a stale torch baton."""
    use_environment_extension_dir()
    use_environment_ninja()
    builder = _shm_builder()
    if builder is None:
        return
    build_dir = ds_internals.extension_build_directory(builder.name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f".{builder.name}.sparse_moe.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)  # stale: nobody else is in the window
            builder.load(verbose=False)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def import_before_init_process_group() -> None:
    """Imports modules whose default arguments would otherwise capture the default group.

    ``torch.distributed.nn.functional`` (imported by DeepSpeed on demand) declares
    ``group=group.WORLD`` defaults, evaluated at import: imported after start-up they hold the
    default process group for the life of the interpreter, so ``destroy_process_group`` cannot
    free it and its gloo threads outlive Python's finalization (see
    ``sparse_moe.train.distributed.shut_down_distributed``). Imported first, the default is
    ``None``, which those functions read as the default group of the moment.
    """
    import torch.distributed.nn.functional  # noqa: F401


def init_deepspeed_distributed(backend: str, timeout: timedelta | None = None) -> None:
    """``deepspeed.init_distributed`` after a safe load of its CPU comm op."""
    if dist.is_initialized():
        return
    import_before_init_process_group()
    load_deepspeed_comm_ops()
    kwargs = {"timeout": timeout} if timeout is not None else {}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               **kwargs)
