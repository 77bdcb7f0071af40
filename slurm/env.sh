# Environment of every job script in slurm/: edit this file for your cluster.
#
# Sourced by the job scripts on the batch node, and by slurm/node_torchrun.sh on every node,
# after `cd $REPO_DIR`. Keep it idempotent (it may run several times in one job) and quiet.

# --- modules (site specific) ------------------------------------------------------------
# module purge
# module load cuda/12.4 nccl/2.21

# --- Python: the project's virtualenv (make install creates .venv) ----------------------
VENV=${VENV:-$REPO_DIR/.venv}
if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
PYTHON=${PYTHON:-python}

# --- threads per process -----------------------------------------------------------------
# One rank per GPU rarely needs more than a few CPU threads; set it to the CPUs per rank.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# --- NCCL (GPU clusters) ----------------------------------------------------------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0          # the interface for bootstrap traffic
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_ASYNC_ERROR_HANDLING=1     # a dead rank fails the job instead of hanging it
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# --- wandb --------------------------------------------------------------------------------
# Runs log offline by default (tracking.wandb_mode); sync later with `wandb sync <run>/wandb`.
# export WANDB_API_KEY=...               # only for tracking.wandb_mode=online
export WANDB_SILENT=${WANDB_SILENT:-true}
export PYTHONUNBUFFERED=1

# --- DeepSpeed's JIT-compiled ops ----------------------------------------------------------
# Ops are compiled at first use into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions),
# under a lock file; a job killed mid-build leaves the lock behind and later jobs wait on it.
# A node-local directory avoids both that and compiling over a shared file system:
# export TORCH_EXTENSIONS_DIR=/tmp/$USER/torch_extensions
