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
# The job scripts set OMP_NUM_THREADS to the CPUs each training process has (the task's
# --cpus-per-task over the processes it starts); a value set here or outside wins.

# --- NCCL (GPU clusters) ----------------------------------------------------------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0          # the interface for bootstrap traffic
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# A dead rank fails the job instead of hanging it (the name before PyTorch 2.2 was
# NCCL_ASYNC_ERROR_HANDLING, which PyTorch no longer reads).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# export NCCL_IB_TIMEOUT=22              # long InfiniBand retries on a congested fabric

# --- wandb --------------------------------------------------------------------------------
# Runs log offline by default (tracking.wandb_mode); sync later with `wandb sync <run>/wandb`.
# export WANDB_API_KEY=...               # only for tracking.wandb_mode=online
export WANDB_SILENT=${WANDB_SILENT:-true}
export PYTHONUNBUFFERED=1

# --- DeepSpeed's JIT-compiled ops ----------------------------------------------------------
# The one op used (the CPU communication op, CPU runs only) is compiled at first use into
# TORCH_EXTENSIONS_DIR, by default <virtualenv>/torch_extensions (parallel/startup.py), under
# a lock the trainer clears when its owner is dead. A node-local directory avoids compiling
# over a shared file system:
# export TORCH_EXTENSIONS_DIR=/tmp/$USER/torch_extensions
