# Shared by the job scripts in slurm/: start-up, signal forwarding, requeue on preemption.
#
# A job script sets its parameters, sources this file, calls `smoe_setup`, then runs its
# launcher with `smoe_run [--ignore-usr1] CMD...`. What happens on preemption:
#
#   1. Slurm sends USR1 to the batch shell (`--signal=B:USR1@<seconds>`), or SIGTERM on a
#      scheduler preemption or `scancel`.
#   2. The shell's trap forwards the signal to the training processes on this node: srun
#      forwards it to its tasks on every node; a local launcher (torchrun, deepspeed) ignores
#      USR1 (so that it survives) while its workers, which install their own handler, get it.
#      TERM goes to the workers only (the processes a launcher started with LOCAL_RANK): the
#      launcher itself would kill them after 30 s (DeepSpeed's at once), and waits for them
#      instead; torchrun gets GRACE_SECONDS as its --shutdown-timeout for a TERM that Slurm
#      sends it directly. To srun a TERM is forwarded as USR1: srun aborts its step on a TERM.
#   3. The training processes agree at the next step boundary, save a checkpoint, rank 0 writes
#      <run>/preempted.json, and they exit.
#   4. `smoe_run` sees preempted.json and calls `scontrol requeue $SLURM_JOB_ID`; the requeued
#      job (same job id, same run directory, SLURM_RESTART_COUNT+1) resumes from the checkpoint.

smoe_log() {
    echo "[$(date '+%F %T')] [job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}] $*"
}

smoe_die() {
    smoe_log "error: $*" >&2
    exit 2
}

# Where runs go unless RUN_DIR is given: RUN_ROOT, else $SCRATCH (the shared scratch file
# system most clusters export), else runs/ in the checkout.
smoe_default_run_dir() {
    echo "${RUN_ROOT:-${SCRATCH:-$REPO_DIR/runs}}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-0}"
}

# cd to the repository, load slurm/env.sh, create the run directory, report the job.
# A training job needs CONFIG (its YAML); the data-prep job sets SMOE_NO_CONFIG=1.
smoe_setup() {
    [[ -n "$REPO_DIR" && -d "$REPO_DIR" ]] || smoe_die "REPO_DIR=$REPO_DIR is not a directory"
    cd "$REPO_DIR" || exit 2
    # shellcheck disable=SC1091
    source slurm/env.sh
    if [[ -z "${SMOE_NO_CONFIG:-}" && -z "$CONFIG" ]]; then
        smoe_die "CONFIG is not set: expected the run's YAML (data.corpus, model.preset...)," \
            "e.g. CONFIG=configs/my_run.yaml sbatch $0 (docs/launch.md)"
    fi
    [[ -z "$CONFIG" || -f "$CONFIG" ]] || smoe_die "CONFIG=$CONFIG: no such file (from $PWD)"
    mkdir -p "$RUN_DIR" || smoe_die "cannot create RUN_DIR=$RUN_DIR"
    smoe_log "start: name=${SLURM_JOB_NAME:-} nodes=${SLURM_JOB_NODELIST:-$(hostname)}" \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} run_dir=$RUN_DIR config=${CONFIG:-none}"
}

# Threads for each training process: the CPUs Slurm gave the task, shared by the processes
# the task starts ($1: 1 for srun tasks, the GPUs per node for a launcher task).
smoe_threads_per_rank() {
    local cpus=${SLURM_CPUS_PER_TASK:-1} ranks=${1:-1}
    (( ranks > 0 )) || ranks=1
    echo $(( cpus / ranks > 0 ? cpus / ranks : 1 ))
}

# The overrides every training launch gets: config, run directory, resume after a requeue.
# RESUME=auto resumes when the job is a requeued one (SLURM_RESTART_COUNT > 0).
smoe_train_args() {
    local args=()
    [[ -n "$CONFIG" ]] && args+=(--config "$CONFIG")
    args+=("run.dir=$RUN_DIR")
    # A checkpoint every SAVE_EVERY_MINUTES of wall time bounds what a node failure, an NCCL
    # abort or an OOM kill can lose (OVERRIDES may still set run.save_every_minutes).
    args+=("run.save_every_minutes=${SAVE_EVERY_MINUTES:-30}")
    if [[ "$RESUME" == 1 || ( "$RESUME" == auto && "${SLURM_RESTART_COUNT:-0}" -gt 0 ) ]]; then
        args+=(run.resume=true)
    fi
    # shellcheck disable=SC2206
    args+=($OVERRIDES)
    SMOE_TRAIN_ARGS=("${args[@]}")
}

# The hosts of the job, one per line (`scontrol show hostnames`).
smoe_hosts() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}"
}

# GPUs per node of the job (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES), else 1.
smoe_gpus_per_node() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" && "$SLURM_GPUS_ON_NODE" -gt 0 ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    else
        echo 1
    fi
}

# A rendezvous port derived from the job id and the restart count: the same on every node of
# one start, another after a requeue (the previous start's may linger in TIME_WAIT), and in
# 15000-24999, below Linux's ephemeral range (32768-60999 by default), from which the kernel
# hands out the ports of outgoing connections.
smoe_port() {
    echo $(( 15000 + (${SLURM_JOB_ID:-0} * 10 + ${SLURM_RESTART_COUNT:-0}) % 10000 ))
}

# Sends signal $1 to process $2 and all its descendants, deepest first.
smoe_signal_tree() {
    local sig=$1 pid=$2 child children
    children=$(cat /proc/"$pid"/task/*/children 2>/dev/null)
    for child in $children; do
        smoe_signal_tree "$sig" "$child"
    done
    kill -s "$sig" "$pid" 2>/dev/null
}

# The training processes a launcher started below process $1 (they carry LOCAL_RANK; the
# launchers themselves do not), one pid per line.
smoe_workers() {
    local pid=$1 child children
    children=$(cat /proc/"$pid"/task/*/children 2>/dev/null)
    for child in $children; do
        if tr '\0' '\n' < /proc/"$child"/environ 2>/dev/null | grep -q '^LOCAL_RANK='; then
            echo "$child"
        else
            smoe_workers "$child"
        fi
    done
}

_smoe_requeue() {
    SMOE_REQUEUED=1
    scontrol requeue "$SLURM_JOB_ID" || smoe_log "scontrol requeue failed (job cancelled?)"
}

# Forwards a signal to the launcher's tree. A USR1 that arrives while the training processes
# are still starting (before they install their handler, while they ignore it) would be lost,
# so it is sent again every SMOE_RESEND_SECONDS until the run ends; the handler is idempotent.
_smoe_forward() {
    SMOE_SIGNAL=$1
    local sig=$1 workers=""
    [[ "$1" == TERM && -n "${SMOE_CHILD:-}" ]] && workers=$(smoe_workers "$SMOE_CHILD")
    if [[ "$1" == TERM && -z "$workers" ]]; then
        # No local workers: the child is srun (or the trainer itself). srun ends its step at
        # once on a TERM ("forcing job termination"), while it forwards a USR1 to its tasks,
        # which then save and exit exactly as on a TERM.
        sig=USR1
    fi
    smoe_log "received SIG$1: forwarding it to the training processes as SIG$sig" \
        "(pid ${SMOE_CHILD:-none})"
    if [[ -n "$workers" ]]; then
        # shellcheck disable=SC2086
        kill -s TERM $workers 2>/dev/null
    elif [[ -n "${SMOE_CHILD:-}" ]]; then
        smoe_signal_tree "$sig" "$SMOE_CHILD"
    fi
    if [[ "$sig" == USR1 && -z "${SMOE_RESENDER:-}" ]]; then
        ( while sleep "${SMOE_RESEND_SECONDS:-15}"; do kill -s USR1 $$ || exit 0; done ) &
        SMOE_RESENDER=$!
    fi
}

_smoe_stop_resender() {
    if [[ -n "${SMOE_RESENDER:-}" ]]; then
        kill "$SMOE_RESENDER" 2>/dev/null
        wait "$SMOE_RESENDER" 2>/dev/null
        SMOE_RESENDER=
    fi
}

# The command prefix that makes a process ignore USR1 until it installs its own handler
# (exec keeps an ignored disposition): for srun tasks and local launchers.
SMOE_IGNORE_USR1=(bash -c 'trap "" USR1; exec "$@"' smoe-ignore-usr1)

# Runs CMD in the background, forwards USR1/TERM to it, waits, and requeues the job when the
# training processes report a preemption (<RUN_DIR>/preempted.json). With --ignore-usr1 the
# launcher itself ignores USR1 (its workers set their own handler); srun must not ignore it,
# it forwards the signal to its tasks (start those with "${SMOE_IGNORE_USR1[@]}").
# Returns CMD's status, or 0 after a requeue (then SMOE_REQUEUED=1: the script should exit).
smoe_run() {
    local ignore=0 status
    if [[ "$1" == --ignore-usr1 ]]; then ignore=1; shift; fi
    SMOE_SIGNAL= SMOE_REQUEUED= SMOE_RESENDER=
    trap '_smoe_forward USR1' USR1
    trap '_smoe_forward TERM' TERM
    if (( ignore )); then
        "${SMOE_IGNORE_USR1[@]}" "$@" &
    else
        "$@" &
    fi
    SMOE_CHILD=$!
    while true; do
        wait "$SMOE_CHILD"
        status=$?
        # wait returns early (status > 128) when a trapped signal arrives; the child lives on.
        kill -0 "$SMOE_CHILD" 2>/dev/null || break
    done
    trap - USR1 TERM
    _smoe_stop_resender
    if [[ -f "$RUN_DIR/preempted.json" ]]; then
        smoe_log "preempted: $(cat "$RUN_DIR/preempted.json"); requeueing job $SLURM_JOB_ID"
        _smoe_requeue
        return 0
    fi
    if [[ -n "$SMOE_SIGNAL" && "$status" -ne 0 ]]; then
        smoe_log "SIG$SMOE_SIGNAL arrived and the run ended with status $status without a" \
            "checkpoint marker; requeueing to resume from the last checkpoint"
        _smoe_requeue
        return 0
    fi
    smoe_log "finished with status $status"
    return "$status"
}
