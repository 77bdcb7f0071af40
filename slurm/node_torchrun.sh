#!/bin/bash
# One task per node of slurm/train_torchrun.sbatch: starts torchrun for this node's GPUs.
#
# Static rendezvous on the job's first node: node rank = SLURM_NODEID, so ranks are laid out
# node by node. torchrun ignores USR1 (it would die of it) and this script forwards the USR1
# or TERM that srun delivers to the workers, which checkpoint at the next step boundary; a
# TERM that reaches torchrun itself gives them GRACE_SECONDS before it kills them. Each
# worker's output goes to <run>/logs/restart-<n>/ as well, and its lines are labelled.
# Usage (inside the job): srun --ntasks-per-node=1 slurm/node_torchrun.sh NPROC ADDR PORT ARGS...

nproc=$1 master_addr=$2 master_port=$3
shift 3
REPO_DIR=${REPO_DIR:-$PWD}
RUN_DIR=${RUN_DIR:?set by the job script}
# shellcheck disable=SC1091
source "$REPO_DIR/slurm/lib.sh"
cd "$REPO_DIR" || exit 2
# shellcheck disable=SC1091
source slurm/env.sh

trap '_smoe_forward USR1' USR1
trap '_smoe_forward TERM' TERM
"${SMOE_IGNORE_USR1[@]}" "$PYTHON" -m torch.distributed.run \
    --nnodes="${SLURM_JOB_NUM_NODES:-1}" --node-rank="${SLURM_NODEID:-0}" \
    --nproc-per-node="$nproc" --master-addr="$master_addr" --master-port="$master_port" \
    --shutdown-timeout="${GRACE_SECONDS:-280}" --tee=3 \
    --log-dir="$RUN_DIR/logs/restart-${SLURM_RESTART_COUNT:-0}-node-${SLURM_NODEID:-0}" \
    -m sparse_moe.train "$@" &
SMOE_CHILD=$!
while true; do
    wait "$SMOE_CHILD"
    status=$?
    kill -0 "$SMOE_CHILD" 2>/dev/null || break
done
_smoe_stop_resender
exit "$status"
