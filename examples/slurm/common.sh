# shellcheck shell=bash
# Shared by the *.sbatch scripts (sourced, not run): starts pretrain_tst.py with one process
# per GPU through srun, optionally inside a pyxis/enroot container, and requeues the job when
# Slurm's time-limit warning made the trainer save a checkpoint and stop early.
#
# Preemption/time limit: the sbatch scripts ask for `#SBATCH --signal=B:USR1@300`, so Slurm
# sends SIGUSR1 to the batch shell 5 minutes before the time limit. The trap below forwards it
# to srun, which forwards it to every task; the trainer (`--exit-signal-handler --exit-signal
# SIGUSR1`) saves a checkpoint after the current step and exits 0, and the job requeues itself
# (`scontrol requeue`, allowed by `#SBATCH --requeue`). The requeued run loads the newest
# checkpoint from --load (= --save) and continues. A hard preemption (SIGTERM, then SIGKILL)
# loses at most the steps since the last --save-interval checkpoint; Slurm requeues such
# `--requeue` jobs by itself.
#
# Environment (all optional):
#   CONTAINER_IMAGE   pyxis image to run in (a squashfs file from `enroot import`, or
#                     docker://...; see docs/docker.md). Empty: the host's $PYTHON.
#   CONTAINER_MOUNTS  pyxis bind mounts (default: the repository, /data, /models and the
#                     checkpoint root, each at the same path).
#   PYTHON            host interpreter when no container is used (default: python).
#   MASTER_PORT       rendezvous port (default: 20000 + job id mod 20000).

: "${REPO:?set REPO to the repository root before sourcing common.sh}"

export MASTER_ADDR
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP communication overlap needs it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# run_pretrain ARGS...: run pretrain_tst.py ARGS on every task of the job; requeue the job if
# the time-limit signal stopped it early. Returns the trainer's exit status otherwise.
run_pretrain() {
    local container=()
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        container=(
            --container-image="$CONTAINER_IMAGE"
            --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO,/data:/data,/models:/models,$CKPT_ROOT:$CKPT_ROOT}"
            --container-workdir="$REPO"
        )
    fi
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes, $SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT"

    local stop_requested=0 srun_pid='' status
    trap 'stop_requested=1; echo "time-limit warning: asking the trainer to save and exit"
          kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
    # One task per GPU; Slurm's per-task variables become torch.distributed's.
    srun --kill-on-bad-exit=1 "${container[@]}" bash -c '
        export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
        cd "$0" && exec "${PYTHON:-python}" pretrain_tst.py "$@"' "$REPO" "$@" &
    srun_pid=$!
    while :; do
        wait "$srun_pid" && status=0 || status=$?
        kill -0 "$srun_pid" 2>/dev/null || break   # still running: the wait was cut by the trap
    done
    trap - USR1
    if [[ $stop_requested == 1 && $status == 0 ]]; then
        echo "checkpoint saved before the time limit: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
