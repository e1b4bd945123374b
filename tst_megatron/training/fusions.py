"""Megatron-LM's fusion defaults, resolved for this device and the kernels that import.

Megatron-LM turns every fusion on by default and offers a ``--no-...`` flag for each
(``megatron/training/arguments.py``); ``--cross-entropy-loss-fusion`` is the one it leaves
off. Here the same flags exist with the same defaults (`arguments.requested_fusions` applies
Megatron-LM's rules to them), and `resolve_fusions` decides what actually reaches
`TransformerConfig`, so a fusion that would fail at the first step (a missing kernel) or crawl
(Megatron-Core's jit fusions are ``torch.compile``, which on CPU compiles with
inductor) is turned off up front, with one log line saying which and why:

- ``--no-bias-swiglu-fusion`` / ``--no-bias-gelu-fusion`` (``bias_activation_fusion``):
  CUDA; GeLU only with biases (Megatron-LM's rule).
- ``--no-bias-dropout-fusion``: CUDA.
- ``--no-masked-softmax-fusion``: CUDA; local spec: apex's masked-softmax kernels.
- ``--no-persist-layer-norm``: CUDA; local spec: apex's persistent LayerNorm and
  ``--normalization LayerNorm``.
- ``--no-rope-fusion`` (``apply_rope_fusion``): CUDA, RoPE, Transformer Engine (its fused
  RoPE kernel).
- ``--no-gradient-accumulation-fusion``: CUDA and apex's ``fused_weight_gradient_mlp_cuda``
  (every mcore tensor-parallel linear, the TE spec's output layer too, needs it).
- ``--cross-entropy-loss-fusion`` (opt-in): CUDA; ``--cross-entropy-fusion-impl te`` needs TE.

On CPU all of them resolve off. With the Transformer Engine spec, masked softmax and persistent
LayerNorm are TE's business; the values pass through as Megatron-LM passes them.
"""

from __future__ import annotations

from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import ParallelConfig
from tst_megatron.settings.environment import TransformerImpl
from tst_megatron.settings.kernels import Fusions
from tst_megatron.settings.model import Normalization


def resolve_fusions(
    wanted: Fusions,
    kernels: KernelAvailability,
    *,
    transformer_impl: TransformerImpl,
    normalization: Normalization,
) -> tuple[Fusions, list[str]]:
    """The fusions this device runs of ``wanted``, and a note for each one turned off.

    ``wanted`` is what the flags ask for (`arguments.requested_fusions`, Megatron-LM's own
    rules applied); ``transformer_impl`` is resolved, ``normalization`` is ``--normalization``.
    """
    on = dict(wanted.as_config_kwargs())
    if not kernels.cuda:
        off = wanted.enabled()
        for name in off:
            on[name] = False
        notes = (
            [
                "no CUDA device: fusions off ("
                + ", ".join(off)
                + "); Megatron-Core's jit fusions would compile with torch inductor on CPU"
            ]
            if off
            else []
        )
        return Fusions(**on), notes
    local = transformer_impl == "local"
    missing = {
        "masked_softmax_fusion": local and not kernels.masked_softmax,
        "persist_layer_norm": local
        and not (kernels.apex_persistent_layer_norm and normalization == "LayerNorm"),
        "apply_rope_fusion": not kernels.transformer_engine,
        "gradient_accumulation_fusion": not kernels.fused_wgrad,
    }
    why = {
        "masked_softmax_fusion": "apex's scaled_(upper_triang_)masked_softmax_cuda kernels",
        "persist_layer_norm": "apex's persistent LayerNorm with --normalization LayerNorm",
        "apply_rope_fusion": "Transformer Engine's fused RoPE",
        "gradient_accumulation_fusion": "apex's fused_weight_gradient_mlp_cuda",
    }
    notes = []
    for name, lacking in missing.items():
        if on[name] and lacking:
            on[name] = False
            notes.append(f"{name} off: needs {why[name]}, which is not installed")
    return Fusions(**on), notes


def p2p_settings(parallel: ParallelConfig) -> dict[str, bool]:
    """Pipeline p2p flags for `TransformerConfig`: Megatron-LM's, except on gloo.

    Megatron-LM: ``overlap_p2p_comm`` (on unless ``--no-overlap-p2p-communication``) only
    applies to the interleaved schedule, and ``batch_p2p_comm = not overlap_p2p_comm``.

    Gloo neither batches nor overlaps. A batched isend/irecv matches messages between the
    same two ranks in posting order; in the interleaved schedule at PP=2 the previous and the
    next stage are the same rank, and each rank posts "send to previous" before "send to
    next" while its peer posts the receives the other way round, so the activations and
    gradients trade places silently (measured on gloo: gradients off by ~1; Megatron-LM
    forbids PP=2 interleaving with batched p2p on NCCL for the same reason, see
    `arguments.validate_args`). The unbatched path orders sends and receives by even/odd rank
    and, for a 2-rank pipeline group, carries one direction over the world group, so nothing
    can be crossed. The overlapped path leaves several of those requests in flight at once;
    on gloo at PP=2 that was measured off too (the interleaved resume test of
    ``tests/test_pretrain.py``: loss 7e-4 away from the single-rank run, against 1e-6 waiting
    on each exchange). Gloo gains nothing from either (it issues operations one by one).
    """
    gloo = parallel.distributed_backend == "gloo"
    interleaved = parallel.virtual_pipeline_model_parallel_size is not None
    overlap = parallel.overlap_p2p_comm and interleaved and not gloo
    return {"overlap_p2p_comm": overlap, "batch_p2p_comm": not overlap and not gloo}
