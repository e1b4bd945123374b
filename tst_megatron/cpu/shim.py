"""Make Megatron-Core (0.16.1, 0.19.x) run on CPU processes that talk over gloo.

Megatron-Core assumes CUDA in a few dozen places that are otherwise device agnostic. On a
CPU-only PyTorch build every one of them raises (``torch.cuda.current_device()``,
``Tensor.cuda()``, ``device="cuda"``, ``pin_memory=True``, CUDA streams and events). The
shim redirects those calls to the CPU and fixes a few gloo/no-TE gaps, so that the same mcore
code paths that run on GPUs (tensor/sequence/context/pipeline/expert parallelism, DDP, the
optimizer) run in CPU test processes. Every patch names the mcore file it is for and why.

Rules:

* Nothing is patched at import time: call :func:`install_cpu_shim` in each CPU process
  (``tests.support.multirank`` does this in every rank it spawns).
* It refuses to install where CUDA is available: on GPUs the real CUDA paths (and Transformer
  Engine) are used and a silent redirect to the CPU would be a disaster.
* Patches on ``torch`` itself only replace calls that raise on a CUDA-less build, except
  ``Tensor.type()``, which answers CUDA type names to ``megatron.core.optimizer`` callers
  only. Patches on mcore replace module attributes (functions, classes, a module's ``torch``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from megatron.core.tensor_parallel import random as tp_random

from tst_megatron.mcore_compat import check_supported

__all__ = ["CpuRNGStatesTracker", "cpu_shim_installed", "install_cpu_shim"]

_installed = False


def cpu_shim_installed() -> bool:
    """Whether :func:`install_cpu_shim` has run in this process."""
    return _installed


def install_cpu_shim(*, allow_with_cuda: bool = False) -> None:
    """Patch torch and Megatron-Core so that mcore runs on CPU (idempotent).

    Args:
        allow_with_cuda: install even though CUDA is available. Only for deliberately running
            the CPU paths on a GPU machine; everything then runs on the CPU.

    Raises:
        RuntimeError: CUDA is available (and ``allow_with_cuda`` is False), or the installed
            Megatron-Core is not a release the patches were written against
            (`tst_megatron.mcore_compat.SUPPORTED_RELEASES`).
    """
    global _installed
    if torch.cuda.is_available() and not allow_with_cuda:
        raise RuntimeError(
            "install_cpu_shim(): CUDA is available. The CPU shim redirects CUDA calls to the "
            "CPU and must never be active on a GPU machine; use the GPU (Transformer Engine) "
            "code path there, or pass allow_with_cuda=True to force CPU execution."
        )
    if _installed:
        return
    check_supported(what="install_cpu_shim()")
    _patch_torch_cuda()
    _patch_device_moves()
    _patch_hardcoded_cuda_factories()
    _patch_rng_tracker()
    _patch_optimizer_type_dispatch()
    _patch_moe()
    _patch_uneven_collectives()
    _refuse_batched_p2p_with_interleaving()
    _patch_torch_fsdp2_mesh()
    _installed = True


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins (global; each of these raises on a CPU-only build)
# --------------------------------------------------------------------------------------------


class _CpuEvent:
    """``torch.cuda.Event`` stand-in: CPU work is synchronous, so every event is complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """``torch.cuda.Stream`` stand-in: there is one (synchronous) CPU stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _patch_torch_cuda() -> None:
    """CUDA device/stream/event calls used by device-agnostic mcore code.

    ``torch.cuda.current_device()`` is passed as ``device=`` to ~100 tensor factories
    (p2p_communication.py receive buffers, param_and_grad_buffer.py grad buffers, rotary
    embeddings, ...): returning ``torch.device("cpu")`` routes them all to the CPU.
    Streams/events: distributed_data_parallel.py and param_and_grad_buffer.py (communication
    stream), moe/token_dispatcher.py (device-to-host stream and event), pipeline schedules
    (``synchronize``).
    """
    cuda: Any = torch.cuda  # untyped: its typed functions and classes are replaced
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = lambda device=None: _CPU_STREAM
    cuda.default_stream = lambda device=None: _CPU_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()


def _patch_device_moves() -> None:
    """``Tensor.cuda()``, ``Module.cuda()`` and ``Tensor.pin_memory()`` keep tensors on the CPU.

    ``Tensor.cuda()``: models/common/embeddings/rope_utils.py (``get_pos_emb_on_this_cp_rank``,
    the rotary embedding's context-parallel slicing), optimizer/optimizer.py and
    grad_scaler.py (state-dict loading), tensor_parallel/data.py (``broadcast_data``).
    ``Module.cuda()``: training scripts move the model as Megatron-LM's ``get_model`` does.
    ``Tensor.pin_memory()``: distributed/param_and_grad_buffer.py (CPU-offloaded buffers).
    "cuda" means the CPU here, so a tensor is already on the device and is returned as is.
    """
    tensor: Any = torch.Tensor  # untyped: its typed methods are replaced
    module: Any = torch.nn.Module
    tensor.cuda = lambda self, *args, **kwargs: self
    tensor.pin_memory = lambda self, *args, **kwargs: self
    module.cuda = lambda self, device=None: self


# --------------------------------------------------------------------------------------------
# Hard-coded device="cuda" / pin_memory=True tensor factories (per mcore module)
# --------------------------------------------------------------------------------------------

# mcore modules that build tensors with a literal device="cuda" (or pin_memory=True) on paths
# the CPU runs exercise. Their module-global ``torch`` is replaced by a namespace whose tensor
# factories build CPU tensors; every other attribute is torch's own.
_CUDA_FACTORY_MODULES = (
    # forward_backward_*: total_num_tokens = torch.zeros([], device="cuda").
    "megatron.core.pipeline_parallel.schedules",
    # get_default_causal_mask / get_sliding_window_causal_mask (softmax's causal mask).
    "megatron.core.transformer.utils",
    # get_pos_emb_on_this_cp_rank: torch.tensor(..., pin_memory=True) (RoPE under CP).
    "megatron.core.models.common.embeddings.rope_utils",
    # MixedPrecisionOptimizer/FP32Optimizer: found_inf, _scale_one, _dummy_overflow_buf.
    "megatron.core.optimizer.optimizer",
    # get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32.
    "megatron.core.optimizer.clip_grads",
    # ConstantGradScaler / DynamicGradScaler scale tensors.
    "megatron.core.optimizer.grad_scaler",
    # RerunStateMachine result validation.
    "megatron.core.rerun_state_machine",
    # broadcast_data: sizes_cuda.
    "megatron.core.tensor_parallel.data",
    # check_param_hashes_across_dp_replicas / packed-sequence helpers.
    "megatron.core.utils",
    # MoE aux-loss logging tracker.
    "megatron.core.transformer.moe.moe_utils",
    # Distributed checkpoint save/load exchange buffers.
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_FACTORIES = frozenset(
    {"arange", "empty", "empty_like", "full", "ones", "ones_like", "tensor", "zeros", "zeros_like"}
)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def cpu_factory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return cpu_factory


class _TorchOnCpu:
    """Stands in for ``torch`` inside one mcore module: tensor factories called with a CUDA
    device or ``pin_memory=True`` build plain CPU tensors; all other attributes are torch's."""

    _wrapped: ClassVar[dict[str, Callable[..., torch.Tensor]]] = {
        name: _on_cpu(getattr(torch, name)) for name in _FACTORIES
    }

    def __getattr__(self, name: str) -> Any:
        wrapped = self._wrapped.get(name)
        return wrapped if wrapped is not None else getattr(torch, name)


def _patch_hardcoded_cuda_factories() -> None:
    torch_on_cpu = _TorchOnCpu()
    for name in _CUDA_FACTORY_MODULES:
        module: Any = importlib.import_module(name)  # untyped: its ``torch`` is replaced
        module.torch = torch_on_cpu


# --------------------------------------------------------------------------------------------
# Tensor-parallel RNG tracker (tensor_parallel/random.py)
# --------------------------------------------------------------------------------------------


class CpuRNGStatesTracker(tp_random.CudaRNGStatesTracker):
    """mcore's ``CudaRNGStatesTracker`` keeping CPU generator states (see _patch_rng_tracker)."""

    _current_state_name: str  # set by mcore's ``reset``

    def add(self, name: str, seed: int) -> None:
        """Track a new state seeded with ``seed`` (same checks as mcore)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cpu rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the body with the CPU generator in state ``name``; restore it afterwards.

        mcore's ``fork`` minus its "CPU RNG state changed within GPU RNG context" warning,
        which here would fire on every use.
        """
        if name not in self.states_:
            raise Exception(f"cpu rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as "
                    f"the desired state name {name}."
                )
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def _cpu_get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _patch_rng_tracker() -> None:
    """The CPU default generator plays the part of the CUDA generator.

    tensor_parallel/random.py keeps named CUDA RNG states (``CudaRNGStatesTracker``) and forks
    them for dropout / initialisation in tensor-parallel regions; activation recomputation
    (``CheckpointFunction``) saves and restores them through ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state``. On CPU there is only the CPU generator, so the tracked states are
    CPU generator states and forking swaps the CPU generator's state in and out.
    ``model_parallel_cuda_manual_seed`` then works unchanged, except that its
    ``torch.cuda.manual_seed`` (the default "data-parallel" state) is a no-op on CPU: seed the
    CPU generator with ``torch.manual_seed`` as well.
    """
    tp_random._get_cuda_rng_state = _cpu_get_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state
    # initialize_rng_tracker() instantiates the module global ``CudaRNGStatesTracker``.
    tp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tp_random.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------
# Optimizer dtype dispatch on tensor.type() strings
# --------------------------------------------------------------------------------------------


def _patch_optimizer_type_dispatch() -> None:
    """``Tensor.type()`` reports CUDA type names to megatron.core.optimizer callers only.

    optimizer/optimizer.py (``Float16OptimizerWithFloat16Params``), optimizer/distrib_optimizer.py
    (``_build_model_and_main_param_groups``) and optimizer/clip_grads.py
    (``clip_grad_by_total_norm_fp32``) pick their code path by comparing ``param.type()`` with
    ``'torch.cuda.FloatTensor'`` etc. and raise for anything else. Other callers see the true
    ``'torch.FloatTensor'``.
    """
    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any):
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return name
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.core.optimizer"):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    tensor: Any = torch.Tensor  # untyped: its typed method is replaced
    tensor.type = type_


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------


def _cpu_maybe_move_tensor_to_cpu(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _patch_moe() -> None:
    """transformer/moe/token_dispatcher.py (``MoEAlltoAllTokenDispatcher``): the all-to-all
    split sizes are converted to host numpy arrays by ``maybe_move_tensor_to_cpu(...,
    as_numpy=True)``, which only converts CUDA tensors; CPU tensors stay tensors and
    ``all_to_all_single`` then rejects them. Convert CPU tensors too.

    transformer/moe/router.py: see `_uncompile`.

    (The missing ``te_general_gemm`` of moe_utils.py is not CPU-specific: see
    `tst_megatron.mcore_fixes`, which the model builder applies on every device.)
    """
    from megatron.core.transformer.moe import router, token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_maybe_move_tensor_to_cpu
    _uncompile(router.TopKRouter, "_apply_expert_bias")


def _uncompile(owner: type, name: str) -> None:
    """Run a ``@jit_fuser`` (``torch.compile``) method of ``owner`` uncompiled.

    transformer/moe/router.py ``TopKRouter._apply_expert_bias`` (the per-expert token count
    of aux-loss-free balancing, ``--moe-router-enable-expert-bias``) is compiled by inductor on
    its first call: ~15 s per CPU rank for one ``+=``. The original function does the same ops.
    """
    method = getattr(owner, name)
    setattr(owner, name, getattr(method, "_torchdynamo_orig_callable", method))


# --------------------------------------------------------------------------------------------
# Uneven all-gather / reduce-scatter on gloo
# --------------------------------------------------------------------------------------------


def _patch_uneven_collectives() -> None:
    """Pad uneven first-dimension all-gather / reduce-scatter to equal shards.

    tensor_parallel/mappings.py ``_gather_along_first_dim(..., output_split_sizes)`` and
    ``_reduce_scatter_along_first_dim(..., input_split_sizes)`` use list collectives with
    per-rank sizes; gloo requires equal sizes ("ProcessGroupGloo::allgather: invalid tensor
    size"). The MoE all-to-all dispatcher uses them over the expert-tensor-parallel group
    (EP x TP). Each shard is zero-padded to the longest, the even tensor collective runs, and
    the padding is dropped. The autograd functions in mappings.py look these helpers up as
    module globals, so the forward and backward passes both go through the padded versions.
    """
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = (
        mappings._gather_along_first_dim,
        mappings._reduce_scatter_along_first_dim,
    )

    def padded_gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None:
            return gather(input_, group, None, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = gather(padded, group)  # [world * longest, ...]
        shards = gathered.split(longest)
        return torch.cat([shard[:n] for shard, n in zip(shards, output_split_sizes, strict=True)])

    def padded_reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None:
            return reduce_scatter(input_, group, None, use_global_buffer)
        longest = max(input_split_sizes)
        padded = input_.new_zeros((group.size() * longest, *input_.shape[1:]))
        for rank, shard in enumerate(input_.split(input_split_sizes)):
            padded[rank * longest : rank * longest + shard.shape[0]] = shard
        return reduce_scatter(padded, group)[: input_split_sizes[group.rank()]]

    mappings._gather_along_first_dim = padded_gather
    mappings._reduce_scatter_along_first_dim = padded_reduce_scatter


# --------------------------------------------------------------------------------------------
# Interleaved pipeline schedule on gloo
# --------------------------------------------------------------------------------------------


def _refuse_batched_p2p_with_interleaving() -> None:
    """Make the interleaved (virtual) pipeline schedule refuse ``batch_p2p_comm=True``.

    pipeline_parallel/schedules.py ``forward_backward_pipelining_with_interleaving`` with the
    default ``config.batch_p2p_comm=True`` batches the sends/receives to the previous and next
    stage (``batch_isend_irecv``). At PP=2 both are the same rank, and on gloo the tensors
    arrive swapped: loss and gradients come out silently wrong (measured at PP=2, VPP=2: O(1)
    relative gradient error). With ``batch_p2p_comm=False`` it is exact. Fail loudly instead.
    """
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.utils import get_model_config

    interleaved = schedules.forward_backward_pipelining_with_interleaving

    @functools.wraps(interleaved)
    def checked(**kwargs: Any) -> Any:
        model = kwargs["model"]
        config = get_model_config(model[0] if isinstance(model, list) else model)
        if config.batch_p2p_comm:
            raise ValueError(
                "CPU/gloo runs of the interleaved pipeline schedule need "
                "config.batch_p2p_comm=False: batched p2p on gloo swaps tensors between stages."
            )
        return interleaved(**kwargs)

    schedules.forward_backward_pipelining_with_interleaving = checked


class _CpuDeviceMesh:
    """Stands in for ``DeviceMesh`` inside torch_fully_sharded_data_parallel.py: a mesh
    requested on "cuda" is built on "cpu"; everything else is torch's `DeviceMesh`."""

    def __getattr__(self, name: str) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        return getattr(DeviceMesh, name)

    @staticmethod
    def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        device_type = "cpu" if device_type.startswith("cuda") else device_type
        return DeviceMesh.from_group(group, device_type, *args, **kwargs)


def _patch_torch_fsdp2_mesh() -> None:
    """distributed/torch_fully_sharded_data_parallel.py: `TorchFullyShardedDataParallel`
    builds its FSDP2 mesh with ``DeviceMesh.from_group(group, "cuda")``; on CPU the mesh (and
    so ``fully_shard``'s all-gathers and reduce-scatters) must be on "cpu" over gloo."""
    from megatron.core.distributed import torch_fully_sharded_data_parallel as fsdp

    fsdp.DeviceMesh = _CpuDeviceMesh()
