"""Pre-train a GPT / MoE model with Token Superposition Training on Megatron-Core.

Launch like Megatron-LM's pretrain_gpt.py, e.g.

    torchrun --nproc-per-node 8 pretrain_tst.py --tensor-model-parallel-size 2 ... \
        --tst-bag-size 6 --tst-phase1-fraction 0.3

Without ``--tst-*`` flags it is a plain baseline trainer. ``--help`` lists every flag.
"""

from __future__ import annotations

import os
import sys
import warnings

# Megatron-Core warns at import when Transformer Engine / apex are absent; the trainer logs the
# kernels it actually uses instead (one line at start-up).
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv: list[str] | None = None) -> int:
    # First: a rank dies with the torchrun that started it (kill -9 of the launcher included).
    from tst_megatron.training.parent_death import end_with_launcher

    end_with_launcher()
    # Before the heavy imports: an exit signal that arrives while the job is still starting
    # is recorded (the loop then exits before its first step), not fatal.
    from tst_megatron.training import exit_signals

    exit_signals.install_from_argv(sys.argv[1:] if argv is None else argv)

    from tst_megatron.settings import Environment, SettingsError
    from tst_megatron.training.arguments import ConfigError, parse_args
    from tst_megatron.training.placement import launch_error
    from tst_megatron.training.run_config import resolve

    single = _single_rank_environment()
    try:
        args = parse_args(argv)
        env = Environment.detect()
        settings = resolve(args, int(os.environ.get("WORLD_SIZE", "1")), env)
        error = launch_error(settings.parallel, env, os.environ)
        if error:
            raise ConfigError(error)
    except (ConfigError, SettingsError) as err:
        print(f"pretrain_tst.py: error: {err}", file=sys.stderr)
        return 2
    reliability = settings.reliability
    if reliability.exit_signal_handler:  # also when only --yaml-config asked for it
        exit_signals.install(reliability.exit_signum)

    from tst_megatron.config import TSTConfigError
    from tst_megatron.data.checks import DataError
    from tst_megatron.data.tokenizer import TokenizerError
    from tst_megatron.training.checkpointing import Checkpointer, CheckpointError, check_load_early
    from tst_megatron.training.faults import TrainingStopped, describe_peer_failure
    from tst_megatron.training.loop import Trainer, initialize_distributed, shutdown_distributed

    if single:
        print(f"pretrain_tst.py: note: {single}", flush=True)
    checkpoints = Checkpointer(settings.checkpoint)
    initialize_distributed(settings.parallel, settings.batch, reliability, settings.schedule.seed)
    code = 0
    trainer = None
    try:
        note = checkpoints.open()  # --save is writable, and this job's alone
        if note and torch_rank() == 0:
            print(f"pretrain_tst.py: note: {note}", flush=True)
        check_load_early(settings.checkpoint.load)  # e.g. written by a newer Megatron-Core
        trainer = Trainer(settings, checkpoints, args.startup_notes)
        trainer.train()
    except (DataError, CheckpointError, TokenizerError, TSTConfigError, TrainingStopped) as err:
        print(f"pretrain_tst.py: error: {err}", file=sys.stderr, flush=True)
        code = 1
    except RuntimeError as err:  # gloo: "Timed out ...", "Connection closed by peer", NCCL
        where = f" after iteration {trainer.progress.iteration}" if trainer else ""
        line = describe_peer_failure(err, reliability.collective_timeout_s, where)
        if line is None:
            raise
        print(f"pretrain_tst.py: error: {line}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:  # SIGINT without --exit-signal SIGINT: stop now, say so
        where = f" at iteration {trainer.progress.iteration}" if trainer else " while starting"
        print(
            f"pretrain_tst.py: interrupted (SIGINT){where}; nothing saved since the last "
            "published checkpoint",
            file=sys.stderr,
            flush=True,
        )
        code = 130
    finally:
        checkpoints.close()
        shutdown_distributed()
    return code


def torch_rank() -> int:
    import torch

    return torch.distributed.get_rank()


def _single_rank_environment() -> str | None:
    """Without a launcher (no ``RANK``/``WORLD_SIZE``), run as one rank: fill in what
    torchrun would set, and say so (None when a launcher set them)."""
    launched = [key for key in ("RANK", "WORLD_SIZE") if key in os.environ]
    if launched:
        return None
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(port)),
    )  # fmt: skip
    return (
        "no launcher environment (RANK, WORLD_SIZE): running as a single rank; for several, "
        "launch with torchrun --nproc-per-node N pretrain_tst.py ... (or tools/launch.py, "
        "or srun with one task per GPU as examples/slurm/common.sh does)"
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the trainer's own handling (imports, start-up)
        print("pretrain_tst.py: interrupted (SIGINT) while starting", file=sys.stderr)
        sys.exit(130)
