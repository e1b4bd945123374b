"""Build a `TSTGPTModel` from validated ``pretrain_tst.py`` arguments.

Mirrors Megatron-LM's `core_transformer_config_from_args` and `pretrain_gpt.model_provider`
for the flags this project exposes. Building a model needs `megatron.core.parallel_state`
initialised; `single_process_parallel_state` provides a 1-rank state for offline use.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

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

from tst_megatron.data.masks import with_document_attention
from tst_megatron.layers.spec import local_block_spec
from tst_megatron.mcore_fixes import apply_mcore_fixes
from tst_megatron.model import TSTGPTModel
from tst_megatron.training import arguments
from tst_megatron.training.arguments import ConfigError
from tst_megatron.training.fusions import p2p_settings

LayerSpec = ModuleSpec | TransformerBlockSubmodules


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """The `TransformerConfig` of validated args (see `arguments.validate_args`).

    Fusions are ``args.fusions`` (Megatron-LM's defaults resolved for this device, see
    `tst_megatron.training.fusions`); pipeline p2p follows `fusions.p2p_settings`.
    """
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        layernorm_zero_centered_gamma=args.apply_layernorm_1p,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear,
        qk_layernorm=args.qk_layernorm,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        attention_softmax_in_fp32=args.attention_softmax_in_fp32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=args.params_dtype,
        pipeline_dtype=args.params_dtype,
        use_cpu_initialization=args.use_cpu_initialization,
        perform_initialization=True,
        variable_seq_lengths=False,
        deallocate_pipeline_outputs=True,
        **p2p_settings(args),
        **args.fusions.as_config_kwargs(),
        transformer_impl=args.transformer_impl,
    )
    if args.num_experts is not None:
        kwargs.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_layer_freq=args.moe_layer_freq,
        )
        kwargs.update(_moe_routing_kwargs(args))
    kwargs.update(_recompute_and_loss_kwargs(args))
    if args.fp8 is not None:
        kwargs.update(fp8=args.fp8, fp8_recipe=args.fp8_recipe, fp8_param=args.fp8_param_gather)
    return TransformerConfig(**kwargs)


def _moe_routing_kwargs(args: argparse.Namespace) -> dict:
    """Router, capacity and dispatch settings (Megatron-LM's ``--moe-*`` flags)."""
    return dict(
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_router_dtype=args.moe_router_dtype,
        moe_permute_fusion=args.moe_permute_fusion,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_token_drop_policy=args.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
    )


def _recompute_and_loss_kwargs(args: argparse.Namespace) -> dict:
    """Activation recomputation (``--recompute-*``), per-token loss and level-1 timer barriers.

    ``recompute_modules`` None lets Megatron-Core pick its default (``["core_attn"]``).
    """
    return dict(
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
        calculate_per_token_loss=args.calculate_per_token_loss,
        barrier_with_L1_time=args.barrier_with_L1_time,
    )


def layer_spec_from_args(
    args: argparse.Namespace, config: TransformerConfig, vp_stage: int | None = None
) -> LayerSpec:
    """The decoder spec for ``--transformer-impl``.

    - ``transformer_engine``: Megatron-Core's TE spec (checks TE is installed first).
    - ``local``: the local spec of `tst_megatron.layers.spec` on any device (mcore's local
      modules, norms that support sequence parallelism); without CUDA with the CPU
      context-parallel attention (`tst_megatron.cpu.layer_spec`). Context parallelism with
      the local spec on GPUs is refused by `arguments.validate_args`.

    With MoE every ``--moe-layer-freq``-th layer is MoE and the others dense: a block spec for
    this pipeline stage (``vp_stage`` chunk), like Megatron-Core's `get_gpt_decoder_block_spec`.
    """
    if args.transformer_impl == "transformer_engine":
        if not arguments.transformer_engine_installed():
            raise ConfigError(arguments.TE_IMPL_MISSING)
        if args.num_experts is not None and args.moe_layer_freq != 1:
            return get_gpt_decoder_block_spec(
                config, use_transformer_engine=True, vp_stage=vp_stage
            )
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=args.num_experts,
            moe_grouped_gemm=args.moe_grouped_gemm,
            qk_layernorm=args.qk_layernorm,
        )
    if torch.cuda.is_available():
        return local_block_spec(config, vp_stage=vp_stage)
    from tst_megatron.cpu.layer_spec import get_cpu_gpt_block_spec

    return get_cpu_gpt_block_spec(config, vp_stage=vp_stage)


def build_model(
    args: argparse.Namespace,
    config: TransformerConfig,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> TSTGPTModel:
    """One pipeline stage (or virtual chunk ``vp_stage``) of the model."""
    apply_mcore_fixes()
    spec = layer_spec_from_args(args, config, vp_stage)
    if args.reset_attention_mask:  # the document mask must reach the attention kernels
        spec = with_document_attention(spec)
    return _build(
        args,
        config,
        spec,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )


def _build(
    args: argparse.Namespace,
    config: TransformerConfig,
    spec: LayerSpec,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None,
) -> TSTGPTModel:
    if args.padded_vocab_size is None:
        raise ConfigError("args.padded_vocab_size is not set (set it from the tokenizer)")
    apply_mcore_fixes()
    return TSTGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        fused_output_loss=args.tst_fused_output_loss,
    )


class ModelProvider:
    """``provider(pre_process, post_process, vp_stage=None) -> TSTGPTModel``.

    All stages and virtual chunks share one `TransformerConfig`, ``provider.config``.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = transformer_config_from_args(args)

    def __call__(
        self, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None
    ) -> TSTGPTModel:
        return build_model(
            self.args,
            self.config,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )


def model_provider_from_args(args: argparse.Namespace) -> ModelProvider:
    """The model provider for mcore-style ``get_model`` loops (see `ModelProvider`)."""
    return ModelProvider(args)


def build_meta_model(args: argparse.Namespace) -> TSTGPTModel:
    """The whole model (TP=PP=CP=EP=1 view) on the meta device: shapes, no memory.

    For parameter counting of any size. It always uses the local spec (torch norms), which
    needs neither Transformer Engine nor a GPU and has the same parameter shapes as the TE
    spec (TE fuses the pre-attention/pre-MLP norms into the following linear layer, so only
    the parameter names differ); grouped-GEMM experts become per-expert MLPs (same counts).
    Runs inside `single_process_parallel_state`.
    """
    view = argparse.Namespace(**vars(args))
    view.tensor_model_parallel_size = 1
    view.pipeline_model_parallel_size = 1
    view.virtual_pipeline_model_parallel_size = None
    view.context_parallel_size = 1
    view.expert_model_parallel_size = 1
    view.expert_tensor_parallel_size = 1
    view.sequence_parallel = False
    view.moe_grouped_gemm = False
    view.transformer_impl = "local"
    view.use_cpu_initialization = True
    view.fp8 = None
    config = transformer_config_from_args(view)
    config.perform_initialization = False
    with single_process_parallel_state(), torch.device("meta"):
        spec = local_block_spec(config, apex=False)
        return _build(view, config, spec, pre_process=True, post_process=True, vp_stage=None)


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
