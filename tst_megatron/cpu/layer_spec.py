"""The GPT block spec of CPU runs: the local spec plus a context-parallel core attention.

The local spec (`tst_megatron.layers.spec`) runs on any device with tensor, sequence,
pipeline and expert parallelism. Context parallelism needs an attention that spans CP ranks:
on GPUs that is Transformer Engine's; on CPU
:class:`~tst_megatron.cpu.attention.CpuContextParallelAttention` replaces mcore's
``DotProductAttention`` (which refuses CP). The rotary embedding's CP slicing
(``rope_utils.get_pos_emb_on_this_cp_rank``) runs on CPU through the shim.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from tst_megatron.cpu.attention import CpuContextParallelAttention
from tst_megatron.layers.spec import local_block_spec

__all__ = ["cpu_core_attention", "get_cpu_gpt_block_spec"]


def cpu_core_attention(config: TransformerConfig) -> type | None:
    """The core attention CPU runs need instead of mcore's (None: mcore's own)."""
    return CpuContextParallelAttention if config.context_parallel_size > 1 else None


def get_cpu_gpt_block_spec(
    config: TransformerConfig, *, vp_stage: int | None = None, pp_rank: int | None = None
) -> TransformerBlockSubmodules:
    """Decoder block spec (layers of this pipeline stage and final norm) for CPU runs."""
    return local_block_spec(
        config, vp_stage=vp_stage, pp_rank=pp_rank, core_attention=cpu_core_attention(config)
    )
