"""Run a function on N CPU ranks (gloo) with Megatron-Core parallel state, for tests.

``run_multirank(fn, world_size, tp=..., pp=..., ...)`` starts ``world_size`` processes. Each
rank hides GPUs (``CUDA_VISIBLE_DEVICES=""``), installs the CPU shim
(:mod:`tst_megatron.cpu.shim`), joins a gloo process group on 127.0.0.1, calls
``megatron.core.parallel_state.initialize_model_parallel``, seeds Python, NumPy, torch and the
tensor-parallel RNG tracker, runs ``fn(*args, **kwargs)`` and returns its value. The parent
gets every rank's return value in rank order; an exception in any rank is re-raised in the
parent as :class:`MultiRankError` carrying that rank's traceback; ranks still running
``timeout_s`` after the start are killed and :class:`MultiRankTimeout` is raised.

Rules for callers (pytest included):

* ``fn`` must be a module-level function of an importable module (it is pickled by reference
  into the rank processes); its arguments and return value must be picklable. Return plain
  data (tensors, floats, dicts); return ``None`` from ranks with nothing to say.
* Start-up: by default ranks are forked from a multiprocessing fork server that imports torch
  and Megatron-Core once per test session (GPUs hidden, nothing patched): the first launch
  costs ~5 s, later ones ~0.3 s. Fresh ``spawn`` interpreters (``start_method="spawn"``) cost
  ~5 s (2 ranks) to ~10 s (4 ranks) on 2 idle cores, every launch. Either way the environment
  and ``sys.path`` are the caller's at launch time. Forked ranks write stdout/stderr where the
  fork server's went (the first launch's); use ``spawn`` to watch a rank's output. Tracebacks
  reach the parent either way.
* Group several checks into one launch: inside a launch, :func:`switch_layout`
  re-initialises the parallel state for another layout of the same world size.
* To compare a parallel layout with the single-rank run, build the model under each layout,
  copy the single-rank weights in with :func:`load_full_params` and collect full gradients
  with :func:`gather_full_grads`.
* Interleaved (virtual) pipeline schedules on gloo need ``config.batch_p2p_comm = False``:
  with the default batched isend/irecv, at PP=2 the previous and next stage are the same rank
  and the tensors arrive swapped, silently (measured: O(1) relative gradient error; exact with
  ``False``). The CPU shim makes the interleaved schedule raise instead.
* mcore's ``jit_fuser`` is ``torch.compile``: on CPU the first call of each fused function
  compiles with inductor (tens of seconds per rank). Keep the config's fusion flags off
  (``bias_activation_fusion``, ``bias_dropout_fusion``, ``masked_softmax_fusion``,
  ``apply_rope_fusion``, ``gradient_accumulation_fusion``).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from multiprocessing import forkserver
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

__all__ = [
    "MultiRankError",
    "MultiRankTimeout",
    "gather_full_grads",
    "gather_full_params",
    "load_full_params",
    "run_multirank",
    "run_single",
    "switch_layout",
]

DEFAULT_SEED = 1234
# Imported once by the fork server; every forked rank starts with them loaded.
_FORKSERVER_PRELOAD = (
    "tst_megatron.cpu.layer_spec",
    "megatron.core.models.gpt",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron.core.optimizer",
)
# After one rank fails, the others usually fail too (a peer vanished); give them this long to
# report before they are killed.
_FAILURE_GRACE_S = 10.0


class MultiRankError(RuntimeError):
    """A rank raised or died: ``rank`` failed first, ``details`` is its traceback text."""

    def __init__(self, rank: int, world_size: int, details: str):
        super().__init__(f"rank {rank} of {world_size} failed:\n{details}")
        self.rank = rank
        self.details = details


class MultiRankTimeout(TimeoutError):
    """Ranks were still running at the launch's deadline and were killed."""


def run_multirank(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout_s: float = 300.0,
    seed: int = DEFAULT_SEED,
    start_method: str = "forkserver",
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` CPU ranks; return the values in rank order.

    Args:
        fn: module-level function of an importable module.
        world_size: number of ranks; a multiple of ``tp * pp * cp`` (the rest is data parallel).
        tp, pp, cp, ep, etp, vpp: tensor, pipeline, context, expert, expert-tensor (default:
            ``tp``) and virtual-pipeline parallel sizes for ``initialize_model_parallel``.
        args, kwargs: passed to ``fn`` (picklable).
        timeout_s: wall-clock limit for the whole launch, start-up included.
        seed: seeds ``random``, NumPy, torch and ``model_parallel_cuda_manual_seed``.
        start_method: "forkserver" (fast, see the module docstring) or "spawn".

    Raises:
        MultiRankError: a rank raised or died; the message holds its traceback.
        MultiRankTimeout: ranks were still running after ``timeout_s`` and were killed.
    """
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(f"world_size {world_size} is not a multiple of tp*pp*cp={tp * pp * cp}")
    layout = dict(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp, seed=seed)
    port = free_port()
    result_dir = Path(tempfile.mkdtemp(prefix="multirank-"))
    ctx = _context(start_method)
    call = (fn, tuple(args), dict(kwargs or {}))
    environ = dict(os.environ)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, layout, call, environ, result_dir),
            name=f"multirank-{rank}",
        )
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
        timed_out = _wait_for_ranks(procs, result_dir, deadline=time.monotonic() + timeout_s)
        return _collect(procs, result_dir, world_size, timed_out, timeout_s)
    finally:
        for proc in procs:
            _kill(proc)
        shutil.rmtree(result_dir, ignore_errors=True)


def run_single(
    fn: Callable[..., Any],
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout_s: float = 300.0,
    seed: int = DEFAULT_SEED,
    start_method: str = "forkserver",
) -> Any:
    """``fn`` on one CPU rank through the same path (the reference run); returns its value."""
    return run_multirank(
        fn,
        1,
        args=args,
        kwargs=kwargs,
        timeout_s=timeout_s,
        seed=seed,
        start_method=start_method,
    )[0]


def switch_layout(
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    seed: int = DEFAULT_SEED,
) -> None:
    """Inside a launched rank: re-initialise parallel state and seeds for another layout."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _initialize(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp, seed=seed)


# --------------------------------------------------------------------------------------------
# Rank side
# --------------------------------------------------------------------------------------------


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    layout: dict[str, Any],
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
    environ: dict[str, str],
    result_dir: Path,
) -> None:
    fn, args, kwargs = call
    os.environ.clear()  # a forked rank has the fork server's environment: use the caller's
    os.environ.update(environ)
    os.environ.update(
        CUDA_VISIBLE_DEVICES="",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        from tst_megatron.cpu.shim import install_cpu_shim

        install_cpu_shim()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        _initialize(**layout)
        _publish(result_dir / f"rank{rank}.pkl", pickle.dumps(fn(*args, **kwargs)))
    except BaseException:  # every failure, even SystemExit, must reach the parent
        failure = (time.time(), traceback.format_exc())  # when: the first failure is the cause
        _publish(result_dir / f"rank{rank}.err", pickle.dumps(failure))
    _teardown()


def _initialize(
    *, tp: int, pp: int, cp: int, ep: int, etp: int | None, vpp: int | None, seed: int
) -> None:
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    random.seed(seed)
    np.random.seed(seed)
    # model_parallel_cuda_manual_seed's own default-state seeding is CUDA-only (a no-op here).
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _publish(path: Path, payload: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    tmp.rename(path)  # atomic: the parent never reads half a file


def _teardown() -> None:
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # the result is already published; exit regardless
        pass


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _context(start_method: str) -> Any:
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
        # The fork server (started once per process) must never see a GPU: its children are
        # CPU ranks and CUDA cannot be used across fork anyway.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            forkserver.ensure_running()
        finally:
            if visible is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return ctx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range.

    A port the OS hands out for ``bind(0)`` comes from the ephemeral range, which outgoing
    connections (gloo's, the other test worker's) draw from too: between this check and the
    launcher's own bind, one of them can take it (``EADDRINUSE``). Below that range only
    explicit binds compete, and a random pick makes two test workers' choices collide rarely.
    """
    low = _ephemeral_port_start()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port below the ephemeral range (starts at {low})")


def _ephemeral_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _failed(proc: mp.Process, result_dir: Path, rank: int) -> bool:
    return proc.exitcode not in (None, 0) or (result_dir / f"rank{rank}.err").exists()


def _wait_for_ranks(procs: list[mp.Process], result_dir: Path, deadline: float) -> bool:
    """Wait until every rank exits; returns True if the deadline passed first.

    Once a rank has failed, the others get ``_FAILURE_GRACE_S`` to report before the caller
    kills them (they may be blocked in a collective with the dead rank).
    """
    while True:
        alive = [proc for proc in procs if proc.is_alive()]
        if not alive:
            return False
        now = time.monotonic()
        if now >= deadline:
            return True
        if any(_failed(proc, result_dir, rank) for rank, proc in enumerate(procs)):
            deadline = min(deadline, now + _FAILURE_GRACE_S)
        wait([proc.sentinel for proc in alive], timeout=min(0.5, deadline - now))


def _collect(
    procs: list[mp.Process],
    result_dir: Path,
    world_size: int,
    timed_out: bool,
    timeout_s: float,
) -> list[Any]:
    """Rank results in order, or raise the first failure (by time) / the timeout."""
    results: list[Any] = []
    failures: list[tuple[float, int, str]] = []  # (when, rank, details)
    unfinished: list[int] = []
    for rank, proc in enumerate(procs):
        result, error = result_dir / f"rank{rank}.pkl", result_dir / f"rank{rank}.err"
        if error.exists():
            when, details = pickle.loads(error.read_bytes())
            failures.append((when, rank, details))
        elif result.exists():
            results.append(pickle.loads(result.read_bytes()))
        elif proc.is_alive():
            unfinished.append(rank)
        else:
            details = f"exited with code {proc.exitcode} before reporting (see its stderr)"
            failures.append((time.time(), rank, details))
    if failures:
        failures.sort()
        _, rank, details = failures[0]
        others = sorted(r for _, r, _ in failures[1:]) + unfinished
        if others:
            details += f"\n(ranks {others} also failed or were killed)"
        raise MultiRankError(rank, world_size, details)
    if timed_out or unfinished:
        raise MultiRankTimeout(
            f"ranks {unfinished} of {world_size} still running after {timeout_s:.0f} s; "
            "killed them (a hang?)"
        )
    return results


def _kill(proc: mp.Process) -> None:
    if proc.pid is None:  # never started
        return
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=5)


# --------------------------------------------------------------------------------------------
# Comparing a parallel layout with the single-rank run
# --------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


def _unwrap(model_chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything holding the model in ``.module``)."""
    while isinstance(getattr(model_chunk, "module", None), torch.nn.Module):
        model_chunk = model_chunk.module
    return model_chunk


def _full_named_params(
    model_chunks: Iterable[torch.nn.Module],
) -> Iterable[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters under their single-rank names.

    Pipeline stages and virtual stages renumber ``decoder.layers.<i>`` locally (mapped back
    through each layer's global ``layer_number``); expert parallelism numbers
    ``experts.local_experts.<j>`` locally (global index ``ep_rank * num_local + j``).
    """
    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for chunk in model_chunks:
        model = _unwrap(chunk)
        decoder = getattr(model, "decoder", None)
        for name, param in model.named_parameters():
            layer = _LAYER.match(name)
            if layer and decoder is not None:
                index = decoder.layers[int(layer.group(1))].layer_number - 1
                name = f"decoder.layers.{index}.{name[layer.end() :]}"
            expert = _EXPERT.search(name)
            if expert:
                prefix, rest = name[: expert.start()], name[expert.end() :]
                num_local = len(model.get_submodule(f"{prefix}.experts").local_experts)
                index = ep_rank * num_local + int(expert.group(1))
                name = f"{prefix}.experts.local_experts.{index}.{rest}"
            yield name, param


def _tp_rank_and_size(param: torch.nn.Parameter) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return 0, 1
    if not getattr(param, "allreduce", True):  # expert parameter: expert-tensor-parallel
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _shard_chunks(param: torch.nn.Parameter) -> tuple[int, int, list[int]]:
    """(dim, chunk length, global chunk indices) of this rank's shard of ``param``.

    Megatron splits the full tensor along ``partition_dim`` into ``tp * stride`` chunks and
    gives rank ``r`` chunks ``r, r + tp, ...`` (``_initialize_affine_weight_cpu``); stride 2
    is SwiGLU's fc1, whose shard is ``[gate_r; up_r]``.
    """
    rank, size = _tp_rank_and_size(param)
    if size == 1:
        return 0, param.shape[0], [0]
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunk = param.shape[dim] // stride
    return dim, chunk, [k * size + rank for k in range(stride)]


def _full_shape(param: torch.nn.Parameter) -> list[int]:
    _, size = _tp_rank_and_size(param)
    shape = list(param.shape)
    if size > 1:
        shape[param.partition_dim] *= size
    return shape


def load_full_params(
    model_chunks: Iterable[torch.nn.Module], full_params: Mapping[str, torch.Tensor]
) -> None:
    """Copy single-rank (unsharded) weights into this rank's model chunks.

    Args:
        model_chunks: this rank's model chunks (DDP-wrapped or not; one per virtual stage).
        full_params: ``dict(single_rank_model.named_parameters())`` of the same architecture.
    """
    with torch.no_grad():
        for name, param in _full_named_params(model_chunks):
            full = full_params[name]
            if list(full.shape) != _full_shape(param):
                raise ValueError(f"{name}: full shape {list(full.shape)} vs {_full_shape(param)}")
            dim, chunk, indices = _shard_chunks(param)
            shard = torch.cat([full.narrow(dim, i * chunk, chunk) for i in indices], dim=dim)
            param.copy_(shard)


def gather_full_params(
    model_chunks: Iterable[torch.nn.Module], *, replica_atol: float = 0.0
) -> dict[str, torch.Tensor]:
    """Every parameter as a full single-rank tensor (collective over all ranks).

    Returns the same dict, keyed by single-rank names, on every rank. See
    :func:`gather_full_grads` for ``replica_atol``.
    """
    return _gather_full(model_chunks, lambda param: param, replica_atol)


def gather_full_grads(
    model_chunks: Iterable[torch.nn.Module], *, replica_atol: float = 0.0
) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full single-rank tensor (collective over all ranks).

    Reads ``param.main_grad`` (DDP) or ``param.grad``; call once gradients are final (after
    ``finalize_model_grads``). Returns the same dict, keyed by single-rank names, on every rank.

    Raises:
        ValueError: two ranks hold the same slice with values differing by more than
            ``replica_atol`` (e.g. a missing all-reduce), or a slice is held by no rank.
    """

    def read(param: torch.nn.Parameter) -> torch.Tensor | None:
        grad = getattr(param, "main_grad", None)
        return param.grad if grad is None else grad

    return _gather_full(model_chunks, read, replica_atol)


def _gather_full(
    model_chunks: Iterable[torch.nn.Module],
    read: Callable[[torch.nn.Parameter], torch.Tensor | None],
    replica_atol: float,
) -> dict[str, torch.Tensor]:
    pieces = []
    for name, param in _full_named_params(model_chunks):
        local = read(param)
        if local is None:
            continue
        dim, chunk, indices = _shard_chunks(param)
        pieces.append((name, _full_shape(param), dim, chunk, indices, local.detach().clone()))
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, pieces)

    full: dict[str, torch.Tensor] = {}
    held: dict[str, torch.Tensor] = {}  # which elements some rank has provided
    for rank_pieces in gathered:
        for name, shape, dim, chunk, indices, local in rank_pieces:
            target = full.setdefault(name, torch.zeros(shape, dtype=local.dtype))
            mask = held.setdefault(name, torch.zeros(shape, dtype=torch.bool))
            for k, index in enumerate(indices):
                region = target.narrow(dim, index * chunk, chunk)
                piece = local.narrow(dim, k * chunk, chunk)
                if mask.narrow(dim, index * chunk, chunk).all():
                    diff = (region - piece).abs().max().item()
                    if diff > replica_atol:
                        raise ValueError(f"{name}: replicas differ by {diff:.3g}")
                region.copy_(piece)
                mask.narrow(dim, index * chunk, chunk).fill_(True)
    missing = [name for name, mask in held.items() if not mask.all()]
    if missing:
        raise ValueError(f"slices held by no rank: {missing}")
    return full
