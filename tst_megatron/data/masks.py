"""The document attention mask and the layer spec that honours it (``--reset-attention-mask``).

Mask convention (Megatron-Core's ``attention_mask_func`` and Transformer Engine's
``attn_mask_type="arbitrary"``): a ``[b, 1, L, L]`` bool tensor, True = masked out.

Why the spec changes: Megatron-Core's GPT layer specs build self-attention with
``attn_mask_type=causal``. With that type the fused paths never read a mask:
`FusedScaleMaskSoftmax` runs its upper-triangular kernel (bf16/fp16 with
``masked_softmax_fusion``) and Transformer Engine's flash/cuDNN attention apply their own
causal mask, so a document mask passed to the model would be silently ignored. The
``arbitrary`` type makes the local path use the masked-softmax kernel (or torch softmax) with
our mask, and Transformer Engine its unfused attention with it (its flash/cuDNN kernels take no
arbitrary mask; the efficient alternative, packed THD sequences with ``cu_seqlens``, is not
implemented). Transformer Engine's context-parallel attention takes no arbitrary mask, so
``--reset-attention-mask`` with ``--context-parallel-size > 1`` is refused at start-up.

Memory: the mask is ``b * L * L`` bytes per micro-batch (16 MiB per sample at L = 4096) and is
built on the device from the ``[b, L]`` document ids in the forward step, once per
micro-batch and pipeline stage, never shipped through the data path. It is small beside what
the attention it feeds already holds: the ``[b, heads/TP, L, L]`` bf16 scores of the local
path are ``2 * heads/TP`` times the mask (32 times for 16 heads at TP = 1).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


def attention_mask_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, L]`` document ids -> ``[b, 1, L, L]`` bool mask, True where query may not see key.

    Query ``q`` sees key ``k`` iff ``k <= q`` and both lie in one document.
    """
    latent = document_ids.shape[1]
    causal = torch.ones(latent, latent, dtype=torch.bool, device=document_ids.device).tril_()
    same_document = document_ids[:, None, :, None] == document_ids[:, None, None, :]
    return ~(same_document & causal)


def with_document_attention(spec):
    """A copy of a GPT layer spec (or block spec) whose self-attention takes an arbitrary mask."""
    if isinstance(spec, TransformerBlockSubmodules):
        return replace(spec, layer_specs=[with_document_attention(s) for s in spec.layer_specs])
    layer = spec.submodules
    attention = layer.self_attention
    if not isinstance(attention, ModuleSpec) or "attn_mask_type" not in attention.params:
        raise TypeError(f"cannot set the attention mask type of layer spec {spec}")
    params = {**attention.params, "attn_mask_type": AttnMaskType.arbitrary}
    attention = replace(attention, params=params)
    return replace(spec, submodules=replace(layer, self_attention=attention))
