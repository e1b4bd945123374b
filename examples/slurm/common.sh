# shellcheck shell=bash
# Shared by the *.sbatch scripts (sourced, not run): starts pretrain_tst.py with one process
# per task (one per GPU) through srun, optionally inside a pyxis/enroot container, requeues
# the job after Slurm's time-limit warning, and states in the job's log how each run ended.
#
# Signal routes (docs/reliability.md, "Signals under Slurm"; proven by tests/test_slurm.py):
# - Time limit: the scripts ask for `#SBATCH --signal=B:USR1@300`, so Slurm sends SIGUSR1 to
#   the batch shell 5 minutes before the time limit (`scancel --signal=USR1 --batch JOB` does
#   the same by hand). The trap below forwards it to srun, which delivers it to every process
#   of the step; the trainer (`--exit-signal-handler --exit-signal SIGUSR1`) saves a checkpoint
#   after the current step and exits 0, and the job requeues itself (`scontrol requeue`,
#   allowed by `#SBATCH --requeue`). The requeued run (SLURM_RESTART_COUNT=1, 2, ...) loads the
#   newest checkpoint from --load (= --save) and continues. Whatever the trainer's exit status
#   after the warning (a warning during start-up, a save that failed), the job is requeued:
#   the time limit would end it anyway, and the next run resumes from the newest published
#   checkpoint.
# - Cancellation / hard preemption (SIGTERM, then SIGKILL after KillWait): the trainer is
#   stopped without a save; a checkpoint being written stays unpublished (`iter_*.tmp`), and
#   the newest published one stays loadable. The log names it. `--requeue` jobs preempted
#   this way are requeued by Slurm itself.
#
# Set before sourcing: REPO (the repository root), CKPT_ROOT (checkpoints; created), CKPT (this
# job's --save/--load directory, named in the log's outcome lines).
# Environment (all optional):
#   CPUS_PER_TASK     CPUs per task given to srun. Default: sbatch's --cpus-per-task when set,
#                     else the node's CPUs divided by its tasks. Passed to srun explicitly:
#                     Slurm 22.05-23.02 srun does not inherit sbatch's --cpus-per-task.
#   CONTAINER_IMAGE   pyxis image to run in (a squashfs file from `enroot import`, or
#                     docker://...; see docs/docker.md). Empty: the host's $TST_PYTHON.
#   CONTAINER_MOUNTS  pyxis bind mounts. Default: the repository and $CKPT_ROOT, plus each of
#                     $CONTAINER_DATA_DIRS (default "/data /models") that exists, each at the
#                     same path.
#   TST_PYTHON        host interpreter when no container is used (default: python). Inside
#                     a container the image's `python` runs: a host interpreter path (or a
#                     generic PYTHON variable of the submitting shell) means nothing there.
#   MASTER_PORT       rendezvous port (default: `master_port`, 10000-32767 from the job id,
#                     below Linux's ephemeral range 32768-60999 that outgoing connections
#                     take their local ports from).
#   CUDA_DEVICE_MAX_CONNECTIONS  default 1: Megatron-LM requires it in the environment, before
#                     CUDA starts, for tensor/context parallelism before Blackwell.
#   OMP_NUM_THREADS   CPU threads per task (default: its CPUs).

: "${REPO:?set REPO to the repository root before sourcing common.sh}"
: "${CKPT_ROOT:?set CKPT_ROOT to the checkpoint root before sourcing common.sh}"

# A time-limit warning before run_pretrain installs its trap is remembered, not fatal.
tst_early_warning=0
trap 'tst_early_warning=1' USR1

# master_port JOB_ID: the job's rendezvous port, 10000-32767 (below the ephemeral range, so no
# outgoing connection on the node holds it; jobs sharing a node differ unless their ids are
# 22768 apart).
master_port() {
    echo $((10000 + $1 % 22768))
}

export MASTER_ADDR
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=${MASTER_PORT:-$(master_port "$SLURM_JOB_ID")}
# Megatron's TP/CP communication overlap needs one hardware queue (before Blackwell), set before
# CUDA initialises; Megatron-FSDP wants more (export another value before sourcing).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# cpus_per_task: what each task may use (see CPUS_PER_TASK above).
cpus_per_task() {
    if [[ -n ${CPUS_PER_TASK:-} ]]; then
        echo "$CPUS_PER_TASK"
    elif [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        echo "$SLURM_CPUS_PER_TASK"
    else
        local tasks=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_NNODES))}
        local cpus=$((${SLURM_CPUS_ON_NODE:-1} / tasks))
        echo $((cpus > 0 ? cpus : 1))
    fi
}

# container_mounts: pyxis --container-mounts value (see CONTAINER_MOUNTS above).
container_mounts() {
    if [[ -n ${CONTAINER_MOUNTS:-} ]]; then
        echo "$CONTAINER_MOUNTS"
        return
    fi
    local mounts="$REPO:$REPO,$CKPT_ROOT:$CKPT_ROOT" dir
    for dir in ${CONTAINER_DATA_DIRS-/data /models}; do
        if [[ -d $dir ]]; then mounts+=",$dir:$dir"; fi
    done
    echo "$mounts"
}

# newest_checkpoint: the iteration $CKPT's tracker names, or "none".
newest_checkpoint() {
    local tracker=${CKPT:-}/latest_checkpointed_iteration.txt
    if [[ -n ${CKPT:-} && -f $tracker ]]; then
        echo "iteration $(<"$tracker") in $CKPT"
    else
        echo "none${CKPT:+ in $CKPT}"
    fi
}

# requeue_job: put this job back in the queue (Slurm then ends this run of it).
requeue_job() {
    scontrol requeue "$SLURM_JOB_ID" || {
        echo "job $SLURM_JOB_ID cannot be requeued (submit it with --requeue): resubmit it"
        return 1
    }
}

# trainer_ready: true when a task of a job step on this node has its SIGUSR1 handler
# installed (SigCgt bit 10 in /proc/PID/status), i.e. a forwarded warning is recorded.
trainer_ready() {
    local pid step localid mask
    while read -r pid _ step localid _; do
        [[ $step =~ ^[0-9]+$ && $localid =~ ^[0-9]+$ ]] || continue
        mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null) || continue
        if [[ -n $mask ]] && ((0x$mask & 0x200)); then return 0; fi
    done < <(scontrol listpids "$SLURM_JOB_ID" 2>/dev/null)
    return 1
}

# forward_warning: deliver the time-limit warning to every task through srun once the trainer
# can take it. srun drops a signal that arrives while it is still launching the tasks, and the
# tasks ignore SIGUSR1 until pretrain_tst.py installs its handler (first thing): a warning
# then waits (checked every second) instead of being lost. One rank that records it is enough
# (the ranks agree at the next step). Uses run_pretrain's srun_pid and forwarder_pid.
forward_warning() {
    if [[ -z $srun_pid || -n $forwarder_pid ]]; then return 0; fi
    if ! scontrol listpids "$SLURM_JOB_ID" >/dev/null 2>&1; then
        kill -USR1 "$srun_pid" 2>/dev/null || true   # no process list here: forward at once
        return 0
    fi
    (
        trap '' USR1
        until trainer_ready; do
            kill -0 "$srun_pid" 2>/dev/null || exit 0
            sleep 1
        done
        kill -USR1 "$srun_pid" 2>/dev/null || true
    ) &
    forwarder_pid=$!
}

# run_pretrain ARGS...: run pretrain_tst.py ARGS on every task of the job; requeue the job
# after the time-limit warning. Returns the trainer's exit status otherwise.
run_pretrain() {
    local cpus
    cpus=$(cpus_per_task)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
    mkdir -p "$CKPT_ROOT"
    local container=() python=${TST_PYTHON:-python}
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        python=python   # the image's interpreter, never a host path
        container=(
            --container-image="$CONTAINER_IMAGE"
            --container-mounts="$(container_mounts)"
            --container-workdir="$REPO"
        )
    fi
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes," \
        "$SLURM_NTASKS tasks, $cpus CPUs per task, rendezvous $MASTER_ADDR:$MASTER_PORT;" \
        "newest checkpoint: $(newest_checkpoint)"

    local warned=0 terminated=0 srun_pid='' status
    if [[ $tst_early_warning == 1 ]]; then
        echo "time-limit warning (SIGUSR1) before the trainer started: requeueing job" \
            "$SLURM_JOB_ID; it resumes from the newest published checkpoint, $(newest_checkpoint)"
        requeue_job
        return
    fi
    local forwarder_pid=''
    trap 'warned=1; echo "time-limit warning (SIGUSR1): asking the trainer to save and exit"
          forward_warning' USR1
    trap 'terminated=1; echo "SIGTERM: the job is being cancelled or preempted; the trainer" \
          "stops without saving"' TERM
    # One task per GPU; Slurm's per-task variables become torch.distributed's. The task starts
    # with SIGUSR1 ignored, so that a warning during the interpreter's start-up is not fatal;
    # pretrain_tst.py gives it back its default action (TST_LAUNCHER_SHIELDED_SIGNALS) and
    # installs its handler first thing; forward_warning waits for that.
    srun --kill-on-bad-exit=1 --cpus-per-task="$cpus" "${container[@]}" bash -c '
        trap "" USR1
        export TST_LAUNCHER_SHIELDED_SIGNALS=SIGUSR1
        export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
        cd "$0" && exec "$1" pretrain_tst.py "${@:2}"' "$REPO" "$python" "$@" &
    srun_pid=$!
    if [[ $warned == 1 ]]; then forward_warning; fi  # it came before srun started
    while :; do
        wait "$srun_pid" && status=0 || status=$?
        kill -0 "$srun_pid" 2>/dev/null || break   # still running: the wait was cut by a trap
    done
    if [[ -n $forwarder_pid ]]; then kill "$forwarder_pid" 2>/dev/null || true; fi
    trap '' USR1   # a late warning changes nothing now
    trap - TERM
    if [[ $terminated == 1 ]]; then
        echo "job $SLURM_JOB_ID cancelled or preempted (trainer exit status $status): nothing" \
            "saved since the newest published checkpoint, $(newest_checkpoint);" \
            "a resumed run continues from it"
    elif [[ $warned == 1 ]]; then
        if [[ $status == 0 ]]; then
            echo "the trainer stopped cleanly after the time-limit warning (saved what it had" \
                "trained), newest checkpoint $(newest_checkpoint): requeueing job $SLURM_JOB_ID"
        else
            echo "the trainer exited with status $status after the time-limit warning" \
                "instead of saving and exiting: requeueing job $SLURM_JOB_ID; it resumes" \
                "from the newest published checkpoint, $(newest_checkpoint)"
        fi
        requeue_job
        return
    elif [[ $status == 0 ]]; then
        echo "job $SLURM_JOB_ID finished: newest checkpoint $(newest_checkpoint)"
    else
        echo "job $SLURM_JOB_ID failed: the trainer exited with status $status; newest" \
            "checkpoint $(newest_checkpoint)"
    fi
    return "$status"
}
