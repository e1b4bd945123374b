"""Tiny fp32 GPT / MoE models for the multi-rank tests (CPU layer specs, local init)."""

from __future__ import annotations

import torch


def tiny_config(
    *,
    moe: bool = False,
    num_layers: int = 2,
    qk_layernorm: bool = False,
    dispatcher: str = "alltoall",
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    sp: bool = False,
):
    """hidden 64, 4 heads / 2 query groups, SwiGLU, RMSNorm, no bias or dropout, fp32.

    ``moe`` adds 4 experts, top-2, no load-balancing loss. Fusions stay off (CPU).
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer.transformer_config import TransformerConfig

    experts = {}
    if moe:
        experts = dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=64,
            moe_token_dispatcher_type=dispatcher,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
        )
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        sequence_parallel=sp,
        pipeline_dtype=torch.float32,
        batch_p2p_comm=False,  # required by the interleaved schedule on gloo (see multirank)
        **experts,
    )
    config.finalize_model_grads_func = finalize_model_grads
    return config


def build_tiny_chunks(config, model_cls, *, vocab: int, seq_len: int, seed: int) -> list:
    """This rank's DDP-wrapped model chunks (one per virtual pipeline stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from tst_megatron.cpu.layer_spec import get_cpu_gpt_block_spec
    from tst_megatron.mcore_fixes import apply_mcore_fixes

    apply_mcore_fixes()
    torch.manual_seed(seed)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        model = model_cls(
            config,
            get_cpu_gpt_block_spec(config, vp_stage=vp_stage),
            vocab_size=vocab,
            max_sequence_length=seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
            vp_stage=vp_stage,
        )
        chunks.append(
            DistributedDataParallel(
                config, DistributedDataParallelConfig(), model, disable_bucketing=bool(chunks)
            )
        )
    return chunks
