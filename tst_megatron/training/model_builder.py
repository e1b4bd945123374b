"""Build a `TSTGPTModel` from the settings sections.

Mirrors Megatron-LM's `core_transformer_config_from_args` and `pretrain_gpt.model_provider`
for the flags this project exposes: the `TransformerConfig` comes from the model section (the
one home of the model's shape) and the parallel, precision, kernels and recompute sections.
Building a model needs `megatron.core.parallel_state` initialised;
`single_process_parallel_state` provides a 1-rank state for offline use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from tst_megatron import kernels as kernels_available
from tst_megatron.data.masks import with_document_attention
from tst_megatron.layers.spec import local_block_spec
from tst_megatron.mcore_fixes import apply_mcore_fixes
from tst_megatron.model import TSTGPTModel
from tst_megatron.settings import (
    KernelsConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    SettingsError,
)
from tst_megatron.settings.kernels import TE_IMPL_MISSING, Fusions
from tst_megatron.training.fusions import p2p_settings

LayerSpec: TypeAlias = ModuleSpec | TransformerBlockSubmodules


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    kernels: KernelsConfig,
    recompute: RecomputeConfig,
    *,
    calculate_per_token_loss: bool = False,
    barrier_with_L1_time: bool = True,
) -> TransformerConfig:
    """The `TransformerConfig` of a run's sections.

    Fusions are ``kernels.fusions`` (Megatron-LM's defaults resolved for the environment, see
    `tst_megatron.training.fusions`); pipeline p2p follows `fusions.p2p_settings`.
    ``calculate_per_token_loss`` (``--calculate-per-token-loss``) and ``barrier_with_L1_time``
    (``--barrier-with-L1-time``) come from the batch and logging sections.
    """
    fusions = kernels.fusions
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        layernorm_zero_centered_gamma=model.apply_layernorm_1p,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        attention_softmax_in_fp32=precision.attention_softmax_in_fp32,
        **parallel.mcore_sizes(),
        sequence_parallel=parallel.sequence_parallel,
        fp16=precision.params_dtype == "fp16",
        bf16=precision.params_dtype == "bf16",
        params_dtype=precision.torch_dtype,
        pipeline_dtype=precision.torch_dtype,
        use_cpu_initialization=kernels.use_cpu_initialization,
        perform_initialization=True,
        variable_seq_lengths=False,
        deallocate_pipeline_outputs=True,
        **p2p_settings(parallel),
        bias_activation_fusion=fusions.bias_activation_fusion,
        bias_dropout_fusion=fusions.bias_dropout_fusion,
        masked_softmax_fusion=fusions.masked_softmax_fusion,
        persist_layer_norm=fusions.persist_layer_norm,
        apply_rope_fusion=fusions.apply_rope_fusion,
        gradient_accumulation_fusion=fusions.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=fusions.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=fusions.cross_entropy_fusion_impl,
        transformer_impl=kernels.transformer_impl,
        recompute_granularity=recompute.recompute_granularity,
        recompute_method=recompute.recompute_method,
        recompute_num_layers=recompute.recompute_num_layers,
        recompute_modules=_list(recompute.recompute_modules),
        calculate_per_token_loss=calculate_per_token_loss,
        barrier_with_L1_time=barrier_with_L1_time,
    )
    if model.moe is not None:
        kwargs.update(_moe_kwargs(model.moe, kernels))
    if precision.fp8 is not None:
        kwargs.update(
            fp8=precision.fp8, fp8_recipe=precision.fp8_recipe, fp8_param=precision.fp8_param_gather
        )
    return TransformerConfig(**kwargs)


def _moe_kwargs(moe: MoEConfig, kernels: KernelsConfig) -> dict[str, Any]:
    """The experts, router, capacity and dispatch settings (Megatron-LM's ``--moe-*`` flags).

    Several aux losses are lists, as Megatron-Core checks them.
    """
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.moe_router_topk,
        moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        moe_aux_loss_coeff=_list(moe.moe_aux_loss_coeff),
        moe_router_load_balancing_type=_list(moe.moe_router_load_balancing_type),
        moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
        moe_grouped_gemm=kernels.moe_grouped_gemm,
        moe_router_score_function=moe.moe_router_score_function,
        moe_router_pre_softmax=moe.moe_router_pre_softmax,
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        moe_layer_freq=moe.moe_layer_freq,
        moe_router_topk_scaling_factor=moe.moe_router_topk_scaling_factor,
        moe_router_num_groups=moe.moe_router_num_groups,
        moe_router_group_topk=moe.moe_router_group_topk,
        moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=moe.moe_router_bias_update_rate,
        moe_router_dtype=moe.moe_router_dtype,
        moe_permute_fusion=kernels.moe_permute_fusion,
        moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
        moe_token_drop_policy=moe.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
    )


def _list(value: Any) -> Any:
    """A section's tuple as the list Megatron-Core expects; anything else as it is."""
    return list(value) if isinstance(value, tuple) else value


def layer_spec(
    model: ModelConfig,
    kernels: KernelsConfig,
    config: TransformerConfig,
    vp_stage: int | None = None,
) -> LayerSpec:
    """The decoder spec for ``kernels.transformer_impl`` (``--transformer-impl``).

    - ``transformer_engine``: Megatron-Core's TE spec (checks TE is installed first).
    - ``local``: the local spec of `tst_megatron.layers.spec` on any device (mcore's local
      modules, norms that support sequence parallelism); without CUDA with the CPU
      context-parallel attention (`tst_megatron.cpu.layer_spec`). Context parallelism with
      the local spec on GPUs is refused by `arguments.validate_args`.

    With MoE every ``--moe-layer-freq``-th layer is MoE and the others dense: a block spec for
    this pipeline stage (``vp_stage`` chunk), like Megatron-Core's `get_gpt_decoder_block_spec`.
    """
    if kernels.transformer_impl == "transformer_engine":
        if not kernels_available.transformer_engine_importable():  # settings for another host
            raise SettingsError(TE_IMPL_MISSING)
        if model.moe is not None and model.moe.moe_layer_freq != 1:
            return get_gpt_decoder_block_spec(
                config, use_transformer_engine=True, vp_stage=vp_stage
            )
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.moe.num_experts if model.moe is not None else None,
            moe_grouped_gemm=kernels.moe_grouped_gemm,
            qk_layernorm=model.qk_layernorm,
        )
    if torch.cuda.is_available():
        return local_block_spec(config, vp_stage=vp_stage)
    from tst_megatron.cpu.layer_spec import get_cpu_gpt_block_spec

    return get_cpu_gpt_block_spec(config, vp_stage=vp_stage)


def build_model(
    model: ModelConfig,
    kernels: KernelsConfig,
    config: TransformerConfig,
    *,
    document_attention: bool = False,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> TSTGPTModel:
    """One pipeline stage (or virtual chunk ``vp_stage``) of the model.

    ``document_attention`` (``--reset-attention-mask``): the document mask reaches the
    attention kernels.
    """
    apply_mcore_fixes()
    spec = layer_spec(model, kernels, config, vp_stage)
    if document_attention:
        spec = with_document_attention(spec)
    return _build(
        model,
        kernels,
        config,
        spec,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )


def _build(
    model: ModelConfig,
    kernels: KernelsConfig,
    config: TransformerConfig,
    spec: LayerSpec,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None,
) -> TSTGPTModel:
    if model.padded_vocab_size is None:
        raise SettingsError("the padded vocabulary size is not set (set it from the tokenizer)")
    apply_mcore_fixes()
    return TSTGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
        fused_output_loss=kernels.tst_fused_output_loss,
    )


def build_meta_model(model: ModelConfig) -> TSTGPTModel:
    """The whole model (TP=PP=CP=EP=1 view) on the meta device: shapes, no memory.

    For parameter counting of any size. It always uses the local spec (torch norms, no
    fusions, fp32), which needs neither Transformer Engine nor a GPU and has the same
    parameter shapes as the TE spec (TE fuses the pre-attention/pre-MLP norms into the
    following linear layer, so only the parameter names differ); grouped-GEMM experts become
    per-expert MLPs (same counts). Runs inside `single_process_parallel_state`.
    """
    kernels = KernelsConfig(
        transformer_impl="local",
        use_cpu_initialization=True,
        fusions=Fusions(
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            cross_entropy_loss_fusion=False,
            cross_entropy_fusion_impl="native",
        ),
    )
    config = transformer_config(
        model,
        ParallelConfig(world_size=1, data_parallel_size=1),
        PrecisionConfig(),
        kernels,
        RecomputeConfig(),
    )
    config.perform_initialization = False
    with single_process_parallel_state(), torch.device("meta"):
        spec = local_block_spec(config, apex=False)
        return _build(model, kernels, config, spec, pre_process=True, post_process=True,
                      vp_stage=None)  # fmt: skip


@contextmanager
def single_process_parallel_state() -> Iterator[None]:
    """Megatron-Core parallel state for one process, if none exists; torn down on exit.

    Starts a 1-rank gloo process group (in-process store, no port) when torch.distributed is
    not initialised. An existing model-parallel state is used as it is when it is the trivial
    one (all sizes 1) and refused otherwise: modules built under it would be sharded.
    """
    if parallel_state.model_parallel_is_initialized():
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if sizes != (1, 1, 1, 1):
            raise RuntimeError(
                "a model-parallel state with (TP, PP, CP, EP) = "
                f"{sizes} is active; build the single-device view in a separate process"
            )
        yield
        return
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError(
            f"torch.distributed runs {dist.get_world_size()} ranks but no model-parallel state; "
            "initialise Megatron-Core's parallel state on all ranks first"
        )
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()
