"""The random-number state of a rank in a checkpoint, as Megatron-LM keys it.

One state per rank holds Python's, NumPy's and torch's CPU generators, the CUDA generator
when CUDA is present, and the tensor-parallel RNG tracker's states (``model-parallel-rng``,
``expert-parallel-rng``, ``data-parallel-rng``: dropout inside tensor-parallel regions and
expert layers draws from these). Keying follows Megatron-LM's ``get_rng_state``
(``megatron/training/checkpointing.py``):

* without expert parallelism, one state per (pipeline, tensor) rank, shared by the
  data-parallel replicas (they draw identically: same seed, same shapes);
* with expert parallelism (EP > 1) one state per (pipeline, tensor, data-parallel) rank:
  expert ranks are data-parallel ranks whose expert tracker differs (its seed includes the
  expert rank), so every rank stores and restores its own.

A state only applies to the layout it was saved at: a resume at another layout does not
load it (as Megatron-LM).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

KEY = "rng_state"


def current_rng_state() -> dict:
    """This rank's generators."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def sharded_rng_state() -> ShardedObject:
    """This rank's RNG state as a `ShardedObject` keyed like Megatron-LM's."""
    pp_rank = ps.get_pipeline_model_parallel_rank()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if ps.get_expert_model_parallel_world_size() > 1:
        dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        return ShardedObject(
            KEY, [current_rng_state()], (pp_size, tp_size, dp_size), (pp_rank, tp_rank, dp_rank),
            replica_id=0,
        )  # fmt: skip
    return ShardedObject(
        KEY, [current_rng_state()], (pp_size, tp_size), (pp_rank, tp_rank), replica_id=dp_rank
    )


def restore_rng_state(loaded) -> None:
    """Set this rank's generators from the state `sharded_rng_state` saved for it."""
    state = loaded[0] if isinstance(loaded, list) else loaded
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = state["rng_tracker_states"]
    if torch.cuda.is_available():  # graph-safe trackers keep another representation
        graph_safe = tensor_parallel.is_graph_safe_cuda_rng_tracker(tracker)
        states = {
            name: tensor_parallel.convert_cuda_rng_state(value, to_graphable=graph_safe)
            for name, value in states.items()
        }
    tracker.set_states(states)
