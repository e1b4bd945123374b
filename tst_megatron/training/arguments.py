"""Command-line arguments of ``pretrain_tst.py``, in the style of Megatron-LM's `pretrain_gpt.py`.

Flag names, attribute names (``args.num_layers``, ``args.tensor_model_parallel_size``, ...),
defaults and meanings follow Megatron-LM (``megatron/training/arguments.py``, core_v0.16); the
``--tst-*`` flags and a few reliability flags are ours. `parse_args` reads the command line
(and an optional YAML file of defaults), `validate_args` checks the combination and fills the
derived fields (data-parallel size, padded vocabulary, ``args.tst``, ...), raising
`ConfigError` with a message that names the flags, their values and what is allowed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from tst_megatron.config import BAG_WEIGHTINGS, TST_FOLDS, TST_MODES, TSTConfig, TSTConfigError
from tst_megatron.data.tokenizer import (
    TOKENIZER_TYPES,
    TokenizerError,
    TokenizerSpec,
    pad_vocab_size,
)
from tst_megatron.settings.environment import Environment
from tst_megatron.settings.kernels import TE_IMPL_MISSING, TE_INSTALL_HINT, Fusions
from tst_megatron.training import fusions
from tst_megatron.training.flag_ranges import check_ranges

EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
CKPT_FORMATS = ("torch_dist",)
DATA_PARALLEL_SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
MOE_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
MOE_LOAD_BALANCING_TYPES = (*MOE_AUX_LOSS_TYPES, "sinkhorn", "none")
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
            "train_iters", "lr")  # fmt: skip
POSITIVE = (*REQUIRED[:-1], "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "context_parallel_size", "expert_model_parallel_size")  # fmt: skip


class ConfigError(ValueError):
    """The command line (or YAML config) asks for an invalid or inconsistent setup."""


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full ``pretrain_tst.py`` parser, one argument group per topic."""
    parser = argparse.ArgumentParser(
        prog="pretrain_tst.py",
        description="Megatron-Core GPT/MoE pre-training with Token Superposition Training.",
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
    )
    _add_config_file_args(parser)
    _add_model_args(parser)
    _add_moe_args(parser)
    _add_parallelism_args(parser)
    _add_precision_args(parser)
    _add_fusion_args(parser)
    _add_optimization_args(parser)
    _add_learning_rate_args(parser)
    _add_data_args(parser)
    _add_checkpointing_args(parser)
    _add_logging_args(parser)
    _add_tst_args(parser)
    _add_reliability_args(parser)
    _add_timing_and_memory_args(parser)
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to flags that take a value and have a fixed default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs != 0 and action.default is not None:
            text += " (default: %(default)s)"
        return text


def _add_config_file_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config file")
    group.add_argument(
        "--yaml-config",
        "--config",
        dest="yaml_config",
        metavar="PATH",
        default=None,
        help="YAML mapping of flag names (num_layers or num-layers) to values. File values "
        "are defaults: flags given on the command line override them. Unknown keys are an "
        "error. Flags without a value take true/false.",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--num-layers", type=int, default=None, help="Number of transformer layers (required)."
    )
    group.add_argument(
        "--hidden-size", type=int, default=None, help="Transformer hidden size (required)."
    )
    group.add_argument(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="MLP hidden size. Default 4*hidden-size, or with --swiglu "
        "int(4*hidden-size*2/3 / 64)*64 (Megatron-LM's rule).",
    )
    group.add_argument(
        "--num-attention-heads",
        type=int,
        default=None,
        help="Number of attention heads (required).",
    )
    group.add_argument(
        "--group-query-attention",
        action="store_true",
        help="Use grouped-query attention with --num-query-groups groups "
        "(1 = multi-query attention when --num-query-groups is not given).",
    )
    group.add_argument(
        "--num-query-groups",
        type=int,
        default=None,
        help="Number of key/value head groups; giving it turns on "
        "grouped-query attention. Default: one group per head (plain MHA).",
    )
    group.add_argument(
        "--kv-channels",
        type=int,
        default=None,
        help="Per-head projection size. Default hidden-size/num-attention-heads.",
    )
    group.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="Context length L in positions (required). In TST phase 1 this is "
        "the number of latent positions; each sample then reads s*(L+1) tokens.",
    )
    group.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="Size of the position table / RoPE cache. Default --seq-length.",
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="Vocabulary size before padding (NullTokenizer, or to fix the model's "
        "vocabulary independently of the tokenizer).",
    )
    group.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this times the tensor-parallel size.",
    )
    group.add_argument(
        "--position-embedding-type",
        default="learned_absolute",
        choices=["rope", "learned_absolute", "none"],
        help="Position embedding type.",
    )
    group.add_argument("--rotary-base", type=int, default=10000, help="RoPE base.")
    group.add_argument(
        "--rotary-percent",
        type=float,
        default=1.0,
        help="Fraction of each head's dimensions that RoPE rotates.",
    )
    group.add_argument(
        "--normalization",
        default="LayerNorm",
        choices=["LayerNorm", "RMSNorm"],
        help="Normalization layer type.",
    )
    group.add_argument(
        "--norm-epsilon", type=float, default=1e-5, help="Epsilon of LayerNorm / RMSNorm."
    )
    group.add_argument(
        "--apply-layernorm-1p",
        action="store_true",
        help="Zero-centred norm weights (weight = 1 + gamma).",
    )
    group.add_argument(
        "--swiglu", action="store_true", help="Gated linear unit with SiLU instead of GeLU."
    )
    group.add_argument(
        "--untie-embeddings-and-output-weights",
        action="store_true",
        help="Give the LM head its own weight instead of sharing the embedding.",
    )
    group.add_argument(
        "--disable-bias-linear",
        action="store_false",
        dest="add_bias_linear",
        help="No biases in the linear layers.",
    )
    group.add_argument(
        "--qk-layernorm", action="store_true", help="Normalize queries and keys per head."
    )
    group.add_argument(
        "--init-method-std",
        type=float,
        default=0.02,
        help="Standard deviation of the normal weight initialization.",
    )
    group.add_argument(
        "--hidden-dropout", type=float, default=0.1, help="Dropout probability on hidden states."
    )
    group.add_argument(
        "--attention-dropout",
        type=float,
        default=0.1,
        help="Dropout probability on attention weights.",
    )
    group.add_argument(
        "--recompute-granularity",
        default=None,
        choices=["full", "selective"],
        help="Activation recomputation: full layers or selected submodules.",
    )
    group.add_argument(
        "--recompute-method",
        default=None,
        choices=["uniform", "block"],
        help="With full recomputation: uniform chunks or the first N layers "
        "of each pipeline stage.",
    )
    group.add_argument(
        "--recompute-num-layers",
        type=int,
        default=None,
        help="Layers per recompute chunk (uniform) or per stage (block).",
    )
    group.add_argument(
        "--recompute-activations",
        action="store_true",
        help="Selective recomputation (Megatron-LM's shorthand for --recompute-granularity "
        "selective): recompute the --recompute-modules, by default core attention.",
    )
    group.add_argument(
        "--recompute-modules",
        nargs="*",
        default=None,
        choices=list(RECOMPUTE_MODULES),
        help="With selective recomputation, the submodules to recompute: core_attn, moe_act "
        "(needs --moe-grouped-gemm), layernorm, mlp (dense MLPs), moe (whole MoE layers), "
        "shared_experts. Default core_attn.",
    )


def _add_moe_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("moe")
    group.add_argument(
        "--num-experts",
        type=int,
        default=None,
        help="Number of routed experts per MoE layer (unset or 0 = dense model).",
    )
    group.add_argument(
        "--moe-router-topk", type=int, default=2, help="Experts each token is routed to."
    )
    group.add_argument(
        "--moe-ffn-hidden-size",
        type=int,
        default=None,
        help="Hidden size of each expert's MLP. Default --ffn-hidden-size.",
    )
    group.add_argument(
        "--moe-shared-expert-intermediate-size",
        type=int,
        default=None,
        help="Total hidden size of the shared experts (unset = none).",
    )
    group.add_argument(
        "--moe-aux-loss-coeff",
        type=float,
        nargs="+",
        default=0.0,
        help="Load-balancing loss coefficient (1e-2 is a usual start); one per "
        "--moe-router-load-balancing-type when several are combined.",
    )
    group.add_argument(
        "--moe-router-load-balancing-type",
        nargs="+",
        default="aux_loss",
        choices=list(MOE_LOAD_BALANCING_TYPES),
        help="Router load balancing: aux_loss (GShard/Switch, per micro-batch), "
        "seq_aux_loss (per sample, DeepSeek-V2/V3), global_aux_loss (over the global batch), "
        "sinkhorn (S-BASE), none. The three aux losses can be combined (give several, with "
        "one --moe-aux-loss-coeff each); sinkhorn and none stand alone.",
    )
    group.add_argument(
        "--moe-token-dispatcher-type",
        default="allgather",
        choices=["allgather", "alltoall"],
        help="Token dispatcher; alltoall is recommended with expert parallelism.",
    )
    group.add_argument(
        "--moe-grouped-gemm", action="store_true", help="Run the local experts as one grouped GEMM."
    )
    group.add_argument(
        "--moe-layer-freq",
        type=int,
        default=1,
        help="One MoE layer every N layers (layer i is MoE when i %% N == 0); "
        "the others are dense.",
    )
    group.add_argument(
        "--moe-router-score-function",
        default="softmax",
        choices=["softmax", "sigmoid"],
        help="Router score function.",
    )
    group.add_argument(
        "--moe-router-pre-softmax",
        action="store_true",
        help="Softmax over all experts before the top-k selection.",
    )
    group.add_argument(
        "--moe-z-loss-coeff",
        type=float,
        default=None,
        help="Router z-loss coefficient (1e-3 is a usual start).",
    )
    _add_moe_routing_and_capacity_args(group)


def _add_moe_routing_and_capacity_args(group: argparse._ArgumentGroup) -> None:
    """Router, capacity and dispatch-speed flags, as Megatron-LM names them."""
    group.add_argument(
        "--moe-router-topk-scaling-factor",
        type=float,
        default=None,
        help="Multiply the top-k routing weights by this (DeepSeek-V3 uses 2.5 with sigmoid "
        "scores); unset = no scaling.",
    )
    group.add_argument(
        "--moe-router-num-groups",
        type=int,
        default=None,
        help="Group-limited routing: split the experts into this many equal groups (e.g. the "
        "expert-parallel size for device-limited routing); needs --moe-router-group-topk.",
    )
    group.add_argument(
        "--moe-router-group-topk",
        type=int,
        default=None,
        help="Group-limited routing: each token picks its experts from this many groups.",
    )
    group.add_argument(
        "--moe-router-enable-expert-bias",
        action="store_true",
        help="Aux-loss-free load balancing (arXiv 2408.15664): a per-expert bias, added to the "
        "sigmoid scores for the top-k choice only, moves by --moe-router-bias-update-rate "
        "after every step towards equal load. The bias is a buffer of the checkpoint. Needs "
        "--moe-router-score-function sigmoid.",
    )
    group.add_argument(
        "--moe-router-bias-update-rate",
        type=float,
        default=1e-3,
        help="Step size of the expert-bias update (sign of the load deficit per expert, over "
        "the global batch); used with --moe-router-enable-expert-bias.",
    )
    group.add_argument(
        "--moe-router-dtype",
        default="fp32",
        choices=["fp32", "fp64", "none"],
        help="Precision of the router logits and of the weighted sum of expert outputs. fp32 "
        "by default here (Megatron-LM leaves it unset and Megatron-Core warns from 32 experts "
        "on); none = the model's precision.",
    )
    group.add_argument(
        "--moe-permute-fusion",
        action="store_true",
        default=None,
        help="Fused token permutation in the dispatcher (Transformer Engine >= 2.1 kernels). "
        "Default: on with --transformer-impl transformer_engine on a GPU when the kernels "
        "import, else off.",
    )
    group.add_argument(
        "--no-moe-permute-fusion",
        action="store_false",
        dest="moe_permute_fusion",
        default=None,
        help="Unfused token permutation even where the fused kernels run.",
    )
    group.add_argument(
        "--moe-expert-capacity-factor",
        type=float,
        default=None,
        help="Token dropping: each expert takes at most capacity = ceil(tokens * topk / "
        "experts * factor) tokens per micro-batch and rank; the rest skip it. Unset = dropless.",
    )
    group.add_argument(
        "--moe-token-drop-policy",
        default="probs",
        choices=["probs", "position"],
        help="Which tokens an expert over capacity drops: the lowest routing weights (probs) "
        "or the last ones in the micro-batch (position).",
    )
    group.add_argument(
        "--moe-pad-expert-input-to-capacity",
        action="store_true",
        help="Pad every expert's input to its capacity (static shapes); needs "
        "--moe-expert-capacity-factor.",
    )


def _add_parallelism_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument(
        "--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size."
    )
    group.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size."
    )
    group.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="Layers per virtual pipeline stage (interleaved schedule).",
    )
    group.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="Context-parallel size (splits the sequence).",
    )
    group.add_argument(
        "--expert-model-parallel-size", type=int, default=1, help="Expert-parallel size."
    )
    group.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="Tensor-parallel size inside each expert. Default --tensor-model-parallel-size.",
    )
    group.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Shard norms/dropout activations along the sequence over the "
        "tensor-parallel group (ignored, with a warning, when TP is 1).",
    )
    group.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="Shard optimizer state over data-parallel ranks.",
    )
    group.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="Overlap the gradient reduce-scatter/all-reduce with backward.",
    )
    group.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="Overlap the distributed optimizer's parameter all-gather with forward.",
    )
    group.add_argument(
        "--use-torch-fsdp2",
        action="store_true",
        help="Fully sharded data parallel with PyTorch FSDP2 (Megatron-Core's "
        "TorchFullyShardedDataParallel): parameters, gradients and optimizer state sharded "
        "over the data-parallel group, one transformer layer all-gathered at a time. Megatron-"
        "LM's rules: no pipeline or expert parallelism, no --use-distributed-optimizer, "
        "--no-gradient-accumulation-fusion, --untie-embeddings-and-output-weights, not fp16.",
    )
    group.add_argument(
        "--torch-fsdp2-no-reshard-after-forward",
        action="store_false",
        dest="torch_fsdp2_reshard_after_forward",
        help="With --use-torch-fsdp2: keep each layer's gathered parameters from its forward "
        "to its backward (ZeRO-2-like: no second all-gather, more memory).",
    )
    group.add_argument(
        "--use-megatron-fsdp",
        action="store_true",
        help="Megatron-Core's own FSDP (Megatron-FSDP), CUDA only; needs "
        "--use-distributed-optimizer. Its checkpoints are Megatron-LM's fsdp_dtensor "
        "format, which this trainer does not write: no --save/--load with it.",
    )
    group.add_argument(
        "--data-parallel-sharding-strategy",
        default="no_shard",
        choices=list(DATA_PARALLEL_SHARDING_STRATEGIES),
        help="Megatron-FSDP's sharding: no_shard (DDP), optim (ZeRO-1), optim_grads "
        "(ZeRO-2), optim_grads_params (ZeRO-3). Only with --use-megatron-fsdp.",
    )
    group.add_argument(
        "--distributed-backend",
        default=None,
        choices=["nccl", "gloo"],
        help="torch.distributed backend. Default nccl with CUDA GPUs, gloo without (said "
        "in the log).",
    )
    group.add_argument(
        "--no-overlap-p2p-communication",
        action="store_false",
        dest="overlap_p2p_comm",
        help="Do not overlap the interleaved pipeline schedule's p2p communication with "
        "compute (then NCCL batches the sends and receives, which needs "
        "--pipeline-model-parallel-size > 2).",
    )
    group.add_argument(
        "--distributed-timeout-minutes",
        type=int,
        default=10,
        help="Default timeout of torch.distributed process groups.",
    )


def _add_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision")
    group.add_argument("--bf16", action="store_true", help="Train in bfloat16.")
    group.add_argument("--fp16", action="store_true", help="Train in float16 with loss scaling.")
    group.add_argument(
        "--fp8-format",
        dest="fp8",
        default=None,
        choices=["e4m3", "hybrid"],
        help="FP8 GEMMs with this format (needs Transformer Engine).",
    )
    group.add_argument(
        "--fp8-recipe",
        default="delayed",
        choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
        help="FP8 scaling recipe.",
    )
    group.add_argument(
        "--fp8-param-gather",
        action="store_true",
        help="Keep compute weights in FP8 and all-gather them in FP8.",
    )
    group.add_argument(
        "--transformer-impl",
        default=None,
        choices=["local", "transformer_engine"],
        help="Layer implementation. Default transformer_engine when a CUDA GPU "
        "and Transformer Engine are present, else local.",
    )
    group.add_argument(
        "--use-cpu-initialization",
        action="store_true",
        help="Initialize weights on the CPU (always on without a GPU).",
    )
    group.add_argument(
        "--attention-softmax-in-fp32",
        action="store_true",
        help="Run attention masking and softmax in fp32.",
    )
    group.add_argument(
        "--accumulate-allreduce-grads-in-fp32",
        action="store_true",
        help="Accumulate and all-reduce gradients in fp32 (always on with --bf16).",
    )
    group.add_argument(
        "--loss-scale",
        type=float,
        default=None,
        help="Static fp16 loss scale; unset = dynamic loss scaling.",
    )
    group.add_argument(
        "--initial-loss-scale", type=float, default=2**32, help="Initial dynamic fp16 loss scale."
    )
    group.add_argument(
        "--min-loss-scale", type=float, default=1.0, help="Minimum dynamic fp16 loss scale."
    )
    group.add_argument(
        "--loss-scale-window",
        type=float,
        default=1000,
        help="Steps without overflow after which the dynamic fp16 loss scale doubles.",
    )
    group.add_argument(
        "--hysteresis",
        type=int,
        default=2,
        help="Consecutive overflow steps before the dynamic fp16 loss scale halves.",
    )


def _add_fusion_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's fusion flags and defaults (see `tst_megatron.training.fusions`)."""
    group = parser.add_argument_group(
        "fusions",
        "Fused kernels, on by default where Megatron-LM has them on; each resolves off (with "
        "a log line) where this device or its installed kernels cannot run it.",
    )
    group.add_argument(
        "--no-masked-softmax-fusion",
        action="store_false",
        dest="masked_softmax_fusion",
        help="Disable the fused scale-mask-softmax of the local attention.",
    )
    group.add_argument(
        "--no-bias-gelu-fusion",
        action="store_false",
        dest="bias_gelu_fusion",
        help="Disable the fused bias + GeLU.",
    )
    group.add_argument(
        "--no-bias-swiglu-fusion",
        action="store_false",
        dest="bias_swiglu_fusion",
        help="Disable the fused bias + SwiGLU (unfused keeps two more [tokens, ffn] "
        "activations per layer for backward).",
    )
    group.add_argument(
        "--no-bias-dropout-fusion",
        action="store_false",
        dest="bias_dropout_fusion",
        help="Disable the fused bias + dropout + residual add.",
    )
    group.add_argument(
        "--no-rope-fusion",
        action="store_false",
        dest="apply_rope_fusion",
        help="Disable Transformer Engine's fused RoPE.",
    )
    group.add_argument(
        "--no-persist-layer-norm",
        action="store_true",
        help="Disable apex's persistent LayerNorm kernel (local spec).",
    )
    group.add_argument(
        "--no-gradient-accumulation-fusion",
        action="store_false",
        dest="gradient_accumulation_fusion",
        help="Disable fusing the weight-gradient GEMM with the fp32 gradient accumulation.",
    )
    group.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="Fused vocab-parallel cross-entropy for standard next-token steps (baseline and "
        "TST phase 2; phase 1's multi-hot loss is always fused). Off by default, as in "
        "Megatron-LM.",
    )
    group.add_argument(
        "--cross-entropy-fusion-impl",
        default="native",
        choices=["native", "te"],
        help="Implementation of --cross-entropy-loss-fusion: Megatron-Core's or Transformer "
        "Engine's.",
    )


def requested_fusions(args: argparse.Namespace) -> Fusions:
    """What the fusion flags ask for, before the device decides (Megatron-LM's own rules)."""
    activation = args.bias_swiglu_fusion if args.swiglu else args.bias_gelu_fusion
    return Fusions(
        # Megatron-LM: "Disable bias gelu fusion if we are disabling bias altogether"
        bias_activation_fusion=activation and (args.swiglu or args.add_bias_linear),
        bias_dropout_fusion=args.bias_dropout_fusion,
        masked_softmax_fusion=args.masked_softmax_fusion,
        persist_layer_norm=not args.no_persist_layer_norm,
        # Megatron-LM: "if args.position_embedding_type != 'rope': args.apply_rope_fusion = False"
        apply_rope_fusion=args.apply_rope_fusion and args.position_embedding_type == "rope",
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
    )


def _add_optimization_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="Samples per model replica per micro-batch (required).",
    )
    group.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Samples per optimizer step. Default micro-batch-size * data-parallel size.",
    )
    group.add_argument(
        "--rampup-batch-size",
        nargs=3,
        type=int,
        default=None,
        metavar=("START", "INCREMENT", "SAMPLES"),
        help="Grow the global batch from START by INCREMENT over SAMPLES samples.",
    )
    group.add_argument(
        "--train-iters",
        type=int,
        default=None,
        help="Total optimizer steps T over all runs (required).",
    )
    group.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="Optimizer (adam = AdamW with decoupled weight decay).",
    )
    group.add_argument("--weight-decay", type=float, default=0.01, help="Weight decay coefficient.")
    group.add_argument(
        "--start-weight-decay",
        type=float,
        default=None,
        help="Initial weight decay for a non-constant --weight-decay-incr-style.",
    )
    group.add_argument(
        "--end-weight-decay",
        type=float,
        default=None,
        help="Final weight decay for a non-constant --weight-decay-incr-style.",
    )
    group.add_argument(
        "--weight-decay-incr-style",
        default="constant",
        choices=["constant", "linear", "cosine"],
        help="How weight decay moves from start to end.",
    )
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")
    group.add_argument(
        "--clip-grad",
        type=float,
        default=1.0,
        help="Clip the global gradient L2 norm to this value (0 = off).",
    )
    group.add_argument("--seed", type=int, default=1234, help="Random seed.")
    group.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="Normalise the loss by the number of loss tokens of the whole global batch "
        "(summed over micro-batches and data-parallel ranks) instead of averaging per-micro-"
        "batch means. A token is a position with an unmasked target; in TST phase 1 a latent "
        "position (its loss is the multi-hot CE, the mean over its unmasked target slots), "
        "see docs/method.md.",
    )


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning-rate")
    group.add_argument("--lr", type=float, default=None, help="Peak learning rate (required).")
    group.add_argument("--min-lr", type=float, default=0.0, help="Floor of the learning rate.")
    group.add_argument(
        "--lr-decay-style",
        default="linear",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
        help="Learning-rate decay (WSD = warmup-stable-decay).",
    )
    group.add_argument(
        "--lr-decay-iters",
        type=int,
        default=None,
        help="Steps over which the learning rate decays. Default --train-iters.",
    )
    group.add_argument(
        "--lr-wsd-decay-style",
        default="exponential",
        choices=["exponential", "linear", "cosine"],
        help="Shape of WSD's final decay.",
    )
    group.add_argument(
        "--lr-wsd-decay-iters",
        type=int,
        default=None,
        help="Length of WSD's final decay in steps (required with WSD).",
    )
    group.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warmup steps.")
    group.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="Warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters).",
    )
    group.add_argument(
        "--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of warmup."
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="Megatron blend: PREFIX, or W1 PREFIX1 W2 PREFIX2 ..., split into "
        "train/valid/test by --split.",
    )
    group.add_argument(
        "--train-data-path", nargs="*", default=None, help="Blend for the training split only."
    )
    group.add_argument(
        "--valid-data-path", nargs="*", default=None, help="Blend for the validation split only."
    )
    group.add_argument(
        "--test-data-path", nargs="*", default=None, help="Blend for the test split only."
    )
    group.add_argument(
        "--split", default="969, 30, 1", help="Train, validation, test proportions for --data-path."
    )
    group.add_argument(
        "--data-cache-path", default=None, help="Directory for the dataset index caches."
    )
    group.add_argument("--mock-data", action="store_true", help="Synthetic data instead of files.")
    group.add_argument(
        "--tokenizer-type",
        default=None,
        choices=list(TOKENIZER_TYPES),
        help="Tokenizer. Default NullTokenizer when only --vocab-size is given.",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="HuggingFace tokenizer.json or its directory, or a SentencePiece model file.",
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocabulary file.")
    group.add_argument("--merge-file", default=None, help="GPT-2 BPE merges file.")
    group.add_argument(
        "--eod-mask-loss",
        action="store_true",
        help="Drop the loss of predictions made from an end-of-document token (the first token "
        "of each document), as Megatron-LM does; in TST phase 1 every target slot holding a "
        "document's first token.",
    )
    group.add_argument(
        "--reset-position-ids",
        action="store_true",
        help="Restart position ids at each document (after each end-of-document token); in TST "
        "bag phases at the first latent position of each document. Learned absolute positions "
        "only: RoPE sees relative positions (use --reset-attention-mask).",
    )
    group.add_argument(
        "--reset-attention-mask",
        action="store_true",
        help="Documents inside a sample attend only within themselves (both TST phases and "
        "validation); a bag spanning a document boundary belongs to the document of its last "
        "token (docs/method.md). Costs a [b, 1, L, L] bool mask per micro-batch on the device "
        "and an unfused attention path with Transformer Engine; not with context parallelism.",
    )
    group.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="Training-data prefetch: 0 reads each step's windows on the training thread; "
        "N >= 1 has one background thread prepare up to N steps ahead while the current one "
        "computes (Megatron-LM: DataLoader worker processes).",
    )
    group.add_argument(
        "--no-create-attention-mask-in-dataloader",
        action="store_false",
        dest="create_attention_mask_in_dataloader",
        help="Megatron-LM: no attention mask from the data loader (the kernel's causal mask). "
        "This trainer never materialises a causal mask; the flag is refused with "
        "--reset-attention-mask, whose document mask Megatron-LM would then drop.",
    )


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", default=None, help="Directory to save checkpoints to.")
    group.add_argument("--load", default=None, help="Directory to resume or load from.")
    group.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="Steps between checkpoints (required with --save).",
    )
    group.add_argument(
        "--ckpt-format",
        default="torch_dist",
        help="Checkpoint format; only torch_dist (Megatron-Core distributed "
        "checkpoints, reshardable across parallel layouts) is supported.",
    )
    group.add_argument(
        "--no-load-optim", action="store_true", help="Do not load the optimizer state."
    )
    group.add_argument(
        "--no-load-rng", action="store_true", help="Do not load the random number generator states."
    )
    group.add_argument(
        "--finetune", action="store_true", help="Load weights only and restart at iteration 0."
    )
    group.add_argument(
        "--ckpt-keep-last",
        type=int,
        default=0,
        help="Keep only the newest N checkpoints (0 = keep all).",
    )
    group.add_argument(
        "--allow-fresh-start",
        action="store_true",
        help="When --load holds no checkpoint, start from scratch instead of failing.",
    )
    group.add_argument(
        "--ckpt-fully-reshardable",
        "--dist-ckpt-optim-fully-reshardable",
        dest="ckpt_fully_reshardable",
        action="store_true",
        help="Save the distributed-optimizer state in the fully_reshardable format (loads at "
        "any parallel layout; gathers every optimizer buffer onto each data-parallel rank at "
        "save). Default dp_reshardable: each rank writes its own shard, reshardable across "
        "data parallel only.",
    )
    group.add_argument(
        "--no-ckpt-fully-parallel-save",
        dest="ckpt_fully_parallel_save",
        action="store_false",
        help="Do not split the writing of replicated tensors over the data-parallel ranks.",
    )
    group.add_argument(
        "--no-ckpt-fully-parallel-load",
        dest="ckpt_fully_parallel_load",
        action="store_false",
        help="Do not split the reading of replicated tensors over the data-parallel ranks "
        "(each rank then reads its whole model-parallel slice).",
    )
    group.add_argument(
        "--async-save",
        action="store_true",
        help="Write the --save-interval checkpoints in a background process while training "
        "continues (Megatron-Core's async save); published once every rank finished. Needs "
        "--use-persistent-ckpt-worker (as in Megatron-LM; turned off with a warning without it).",
    )
    group.add_argument(
        "--use-persistent-ckpt-worker",
        action="store_true",
        help="Write --async-save checkpoints in one persistent worker process per rank "
        "(spawned at the first async save) instead of a process forked per save.",
    )
    group.add_argument(
        "--override-save-lock",
        action="store_true",
        help="Take over the --save lock held by another job (only when that job is gone, "
        "e.g. its node died; two writers corrupt each other's checkpoints).",
    )
    group.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        dest="override_opt_param_scheduler",
        action="store_true",
        help="On resume, use this run's learning-rate / weight-decay schedule flags instead of "
        "refusing ones that differ from the checkpoint's (Megatron-LM's flag).",
    )
    group.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        dest="use_checkpoint_opt_param_scheduler",
        action="store_true",
        help="On resume, continue with the checkpoint's learning-rate / weight-decay schedule "
        "and ignore this run's schedule flags instead of refusing ones that differ "
        "(Megatron-LM's flag).",
    )
    group.add_argument(
        "--tst-allow-schedule-change",
        action="store_true",
        help="On resume, allow a TST phase-1 length (--tst-phase1-fraction / "
        "--tst-phase1-iters x --train-iters) that differs from the checkpoint's, or "
        "--tst-phase 2 from a checkpoint inside phase 1.",
    )


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-interval", type=int, default=100, help="Steps between training log lines."
    )
    group.add_argument(
        "--eval-interval", type=int, default=1000, help="Steps between validation runs."
    )
    group.add_argument(
        "--eval-iters",
        type=int,
        default=100,
        help="Validation iterations per evaluation (0 = no evaluation).",
    )
    group.add_argument("--tensorboard-dir", default=None, help="TensorBoard log directory.")
    group.add_argument(
        "--wandb-project", default=None, help="Weights & Biases project (unset = no wandb)."
    )
    group.add_argument("--wandb-exp-name", default=None, help="Weights & Biases run name.")
    group.add_argument("--wandb-save-dir", default=None, help="Local Weights & Biases directory.")
    group.add_argument(
        "--metrics-jsonl",
        default=None,
        help="Append every logged step and validation as one JSON line to this file "
        "(full-precision losses; the demo plots its loss curve from it).",
    )
    group.add_argument(
        "--log-throughput",
        action="store_true",
        help="Add model TFLOP/s per GPU and MFU to the training log line (as Megatron-LM "
        "does with this flag; the --metrics-jsonl record always has them).",
    )
    group.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Per-GPU peak TFLOP/s for MFU. Default from the GPU model: its dense BF16 peak, "
        "also with --fp8-format (MFU is conventionally quoted against the BF16 peak); none "
        "on CPU.",
    )


def _add_tst_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TST", "Token Superposition Training.")
    group.add_argument(
        "--tst-bag-size",
        type=int,
        default=1,
        help="Bag size s: tokens averaged per latent position and targets per "
        "position in phase 1 (1 = TST off, plain next-token training).",
    )
    group.add_argument(
        "--tst-phase1-fraction",
        type=float,
        default=None,
        help="Phase 1 is the first r*T steps, r in (0, 1) (0.2-0.4 reported).",
    )
    group.add_argument(
        "--tst-phase1-iters",
        type=int,
        default=None,
        help="Phase 1 length in steps (instead of --tst-phase1-fraction).",
    )
    group.add_argument(
        "--tst-mode",
        default="full",
        choices=list(TST_MODES),
        help="full: bag inputs + multi-hot targets; input-only; output-only.",
    )
    group.add_argument(
        "--tst-phase",
        default="auto",
        choices=["auto", "1", "2"],
        help="auto: switch phases in this job at the boundary; 1: this job runs "
        "phase 1 only; 2: this job runs phase 2 from the phase-1 checkpoint "
        "in --load.",
    )
    group.add_argument(
        "--tst-bag-weighting",
        default="uniform",
        choices=list(BAG_WEIGHTINGS),
        help="Weight g(i) of the i-th token of the next bag in the phase-1 multi-hot loss, "
        "normalised over each position's unmasked targets: uniform 1, power-law 1/i, "
        "exponential exp(-i), first-token (i = 1 only). The report found power-law better "
        "for s >= 8 and uniform better at s = 4.",
    )
    group.add_argument(
        "--tst-bag-weights",
        nargs="+",
        type=float,
        default=None,
        metavar="W",
        help="Explicit weights W1 .. Ws of the s target tokens (instead of "
        "--tst-bag-weighting), e.g. the report's fitted power law C0 + a*i^k "
        "(docs/method.md shows how to compute them).",
    )
    group.add_argument(
        "--tst-fold",
        default="sequence",
        choices=list(TST_FOLDS),
        help="Where phase 1's s-fold data goes. sequence: a sample reads s*L tokens into L "
        "latent positions. batch: a sample reads L tokens into L/s latent positions and "
        "a micro-batch holds s times as many samples (same GEMM FLOPs and data per step, "
        "s times cheaper attention).",
    )
    group.add_argument(
        "--tst-fused-output-loss",
        action="store_true",
        help="Compute the output layer and the loss (multi-hot in phase 1, standard CE "
        "otherwise) chunk by chunk over tokens without keeping the [tokens, V/TP] logits.",
    )


def _add_reliability_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reliability")
    group.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="On --exit-signal, save a checkpoint and exit cleanly.",
    )
    group.add_argument(
        "--exit-signal",
        default="SIGTERM",
        choices=list(EXIT_SIGNALS),
        help="Signal that --exit-signal-handler reacts to.",
    )
    group.add_argument(
        "--exit-duration-in-mins",
        type=int,
        default=None,
        help="Save and exit after this many minutes of wall time.",
    )
    group.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="Save and exit when the iteration is a multiple of this.",
    )
    group.add_argument(
        "--max-bad-steps",
        type=int,
        default=3,
        help="Stop after this many consecutive steps with a NaN/Inf loss or gradient norm.",
    )
    group.add_argument(
        "--collective-timeout-s",
        type=float,
        default=None,
        help="Timeout of collectives (hang detection) in seconds; sets the "
        "process-group timeout. Default --distributed-timeout-minutes * 60.",
    )


def _add_timing_and_memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timing and memory")
    group.add_argument(
        "--timing-log-level",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="Megatron-Core timers: 0 = iteration and checkpoint times only; 1 adds "
        "batch-generator (data), forward-backward, gradient all-reduce (all-grads-sync), "
        "optimizer and its parts, once per step; 2 adds per-micro-batch forward/backward "
        "compute and pipeline send/recv. Printed every --log-interval.",
    )
    group.add_argument(
        "--timing-log-option",
        default="minmax",
        choices=["max", "minmax", "all"],
        help="Report the max, the (min, max) or every rank's time of each timer.",
    )
    group.add_argument(
        "--no-barrier-with-level-1-timing",
        action="store_false",
        dest="barrier_with_L1_time",
        help="Do not put a barrier before the level-1 timers (by default they wait for every "
        "rank, so they measure the step and not the wait for stragglers).",
    )
    group.add_argument(
        "--log-timers-to-tensorboard",
        action="store_true",
        help="Also write the timers (max over ranks) to TensorBoard / W&B.",
    )
    group.add_argument(
        "--manual-gc",
        action="store_true",
        help="Disable Python's automatic garbage collector and collect at fixed points "
        "instead, so that all ranks pause together.",
    )
    group.add_argument(
        "--manual-gc-interval",
        type=int,
        default=0,
        help="With --manual-gc: collect every N training steps (0 = only around evaluations).",
    )
    group.add_argument(
        "--no-manual-gc-eval",
        action="store_false",
        dest="manual_gc_eval",
        help="With --manual-gc: do not collect before and after each evaluation.",
    )


# --------------------------------------------------------------------------------------------
# Parsing, with an optional YAML file of defaults
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); unknown flags exit with argparse's error.

    With ``--yaml-config PATH`` the file's values become the parser's defaults, so any flag
    on the command line overrides them.
    """
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("--yaml-config", "--config", dest="yaml_config", default=None)
    yaml_path = config_parser.parse_known_args(argv)[0].yaml_config
    if yaml_path is not None:
        parser.set_defaults(**load_yaml_defaults(parser, yaml_path))
    return parser.parse_args(argv)


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """Read a YAML config into ``{dest: value}`` for ``parser.set_defaults``.

    Keys are flag names in either spelling (``num_layers`` / ``num-layers``) or attribute
    names (``add_bias_linear``); a key of a flag without a value (``disable_bias_linear``)
    takes a boolean meaning "flag given".
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --yaml-config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--yaml-config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--yaml-config {path} must hold a mapping of flag names to values")
    targets = _yaml_targets(parser)
    defaults = {}
    for key, value in data.items():
        target = targets.get(str(key).replace("-", "_"))
        if target is None:
            raise ConfigError(
                f"unknown key {key!r} in --yaml-config {path}: not a pretrain_tst.py flag "
                "(keys are flag names such as num_layers or num-layers; see --help)"
            )
        action, via_flag = target
        defaults[action.dest] = _yaml_value(action, via_flag, value, f"{key!r} in {path}")
    return defaults


def _yaml_targets(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """Key -> (action, whether the key is the flag's name rather than its attribute)."""
    targets: dict[str, tuple[argparse.Action, bool]] = {}
    for action in parser._actions:
        if action.dest in ("help", "yaml_config"):
            continue
        targets[action.dest] = (action, False)
        for option in action.option_strings:
            targets.setdefault(option.lstrip("-").replace("-", "_"), (action, True))
    return targets


def _yaml_value(action: argparse.Action, via_flag: bool, value: Any, where: str) -> Any:
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        if via_flag:
            return action.const if value else action.default
        return value
    if value is None:
        return None
    if action.nargs is None or action.nargs == "?":
        return _yaml_scalar(action, value, where)
    items = value.split() if isinstance(value, str) else value
    if action.nargs in ("+", "*") and isinstance(items, (int, float)):
        items = [items]  # one value of a list flag, e.g. moe-aux-loss-coeff: 1.0e-3
    if not isinstance(items, list):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise ConfigError(f"{where} needs {action.nargs} values, got {len(items)}: {items!r}")
    return [_yaml_scalar(action, item, where) for item in items]


_KIND_NAMES: dict[Any, str] = {int: "an integer", float: "a number", str: "a string"}


def _yaml_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    kind: Callable[[Any], Any] = action.type or str  # type: ignore[assignment]
    name = _KIND_NAMES.get(kind, f"a {getattr(kind, '__name__', kind)} value")
    if isinstance(value, (bool, dict, list)):
        raise ConfigError(f"{where} must be a single value ({name}), got {value!r}")
    if kind is int and isinstance(value, float):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} must be {name}, got {value!r}") from exc
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(str(choice) for choice in action.choices)
        raise ConfigError(f"{where} must be one of {allowed}; got {converted!r}")
    return converted


# --------------------------------------------------------------------------------------------
# Validation and derived fields
# --------------------------------------------------------------------------------------------


def validate_args(
    args: argparse.Namespace, world_size: int, env: Environment | None = None
) -> None:
    """Check ``args`` for a job of ``world_size`` ranks on ``env`` and fill the derived fields.

    ``env`` is the machine the job runs on (default: this process, `Environment.detect`);
    validation asks the machine nothing else (CUDA, Transformer Engine, kernels, peak
    TFLOP/s all come from ``env``), so a GPU node's flags validate on a CPU host
    (`tst_megatron.training.run_config.resolve`).

    Derived: ``world_size``, ``data_parallel_size``, ``transformer_impl`` (when unset),
    ``use_cpu_initialization`` (forced on without CUDA), ``params_dtype``, ``ffn_hidden_size``,
    ``kv_channels``, ``num_query_groups``, ``group_query_attention``,
    ``max_position_embeddings``, ``padded_vocab_size`` (None until the caller sets it from the
    tokenizer when ``--vocab-size`` is not given), ``expert_tensor_parallel_size``,
    ``moe_ffn_hidden_size``, ``virtual_pipeline_model_parallel_size``, ``global_batch_size``,
    ``lr_decay_iters``, ``lr_warmup_iters``, ``start/end_weight_decay``, ``tokenizer_type``,
    ``collective_timeout_s``, ``exit_signal`` (a `signal.Signals`), ``peak_tflops``,
    ``tst`` (a `TSTConfig`), ``distributed_backend`` (when unset), ``fusions`` (a
    `tst_megatron.training.fusions.Fusions`: what this device runs) and ``startup_notes``
    (lines for the start of the log: fusions turned off, the backend chosen).

    The launch environment (``CUDA_DEVICE_MAX_CONNECTIONS``) is the entry point's to check,
    with `placement.launch_error`.

    Raises:
        ConfigError: naming the offending flags, their values and what is allowed.
    """
    env = env or Environment.detect()
    args.world_size = world_size
    args.startup_notes = []
    _check_required(args)
    check_ranges(args, ConfigError)
    _validate_implementation(args, env)
    _validate_precision(args)
    _validate_backend(args, env)
    _validate_parallel_layout(args)
    _validate_fsdp(args, env)
    _validate_local_spec(args, env)
    _validate_model_shape(args)
    _validate_moe(args, env)
    _validate_recompute(args, env)
    _validate_batch(args)
    _validate_learning_rate(args)
    _validate_data(args)
    _validate_checkpointing(args)
    _validate_logging(args, env)
    _validate_tst(args)
    _validate_reliability(args)
    _validate_timing_and_memory(args)
    _validate_fusions(args, env)


def _check_required(args: argparse.Namespace) -> None:
    for dest in REQUIRED:
        if getattr(args, dest) is None:
            raise ConfigError(f"--{dest.replace('_', '-')} is required")
    for dest in POSITIVE:
        _check_positive(args, dest)


def _check_positive(args: argparse.Namespace, dest: str) -> None:
    value = getattr(args, dest)
    if value is not None and value < 1:
        raise ConfigError(f"--{dest.replace('_', '-')} must be >= 1, got {value}")


def _validate_implementation(args: argparse.Namespace, env: Environment) -> None:
    has_cuda, has_te = env.cuda, env.transformer_engine
    if args.fp8 is not None and not has_te:
        raise ConfigError(
            f"--fp8-format {args.fp8} needs Transformer Engine, which is not installed: "
            f"{TE_INSTALL_HINT} or drop --fp8-format"
        )
    args.transformer_impl_resolved = args.transformer_impl is None
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if has_cuda and has_te else "local"
        if has_cuda and not has_te:
            warnings.warn(
                "Transformer Engine is not installed: using --transformer-impl local "
                f"({TE_INSTALL_HINT} for the faster fused layers and FP8)",
                stacklevel=3,
            )
    if args.transformer_impl == "transformer_engine" and not has_te:
        raise ConfigError(TE_IMPL_MISSING)
    if args.fp8 is not None and args.transformer_impl != "transformer_engine":
        raise ConfigError(
            f"--fp8-format {args.fp8} needs --transformer-impl transformer_engine "
            f"(got {args.transformer_impl}); FP8 GEMMs come from Transformer Engine"
        )
    if not has_cuda:
        args.use_cpu_initialization = True


def _validate_precision(args: argparse.Namespace) -> None:
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive; give at most one")
    if args.fp8_param_gather:
        if args.fp8 is None:
            raise ConfigError("--fp8-param-gather needs --fp8-format")
        if not args.use_distributed_optimizer:
            raise ConfigError("--fp8-param-gather needs --use-distributed-optimizer")
    if args.bf16:
        args.params_dtype = torch.bfloat16
        # Megatron-LM: "bfloat16 requires gradient accumulation and all-reduce to be
        # performed in fp32"
        args.accumulate_allreduce_grads_in_fp32 = True
    elif args.fp16:
        args.params_dtype = torch.float16
    else:
        args.params_dtype = torch.float32
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise ConfigError(f"--loss-scale must be > 0, got {args.loss_scale}")
    if not 0 < args.min_loss_scale <= args.initial_loss_scale:
        raise ConfigError(
            f"--min-loss-scale {args.min_loss_scale} must be > 0 and at most "
            f"--initial-loss-scale {args.initial_loss_scale:g}"
        )
    if args.loss_scale_window <= 0 or args.hysteresis < 1:
        raise ConfigError(
            f"--loss-scale-window must be > 0 and --hysteresis >= 1, got "
            f"{args.loss_scale_window:g} and {args.hysteresis}"
        )


def _validate_backend(args: argparse.Namespace, env: Environment) -> None:
    """nccl with CUDA, gloo without: the default, or a clear error for nccl without GPUs."""
    has_cuda = env.cuda
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if has_cuda else "gloo"
        if not has_cuda:
            args.startup_notes.append(
                "no CUDA device visible: torch.distributed backend gloo (CPU); pass "
                "--distributed-backend to choose explicitly"
            )
    elif args.distributed_backend == "nccl" and not has_cuda:
        raise ConfigError(
            "--distributed-backend nccl needs CUDA GPUs, and none is visible (torch "
            f"{torch.__version__}, CUDA available: no): use --distributed-backend gloo to run "
            "on CPUs"
        )


def _validate_local_spec(args: argparse.Namespace, env: Environment) -> None:
    """What the local (no-TE) spec cannot do on GPUs, refused before any work."""
    if args.transformer_impl != "local":
        return
    kernels = env.kernels
    if kernels.cuda and args.context_parallel_size > 1:
        raise ConfigError(
            f"--context-parallel-size {args.context_parallel_size} with --transformer-impl "
            "local: Megatron-Core's local attention (DotProductAttention) has no context "
            "parallelism on GPUs; use --transformer-impl transformer_engine (TE's attention "
            "does CP), or --context-parallel-size 1"
        )
    apex_norm = kernels.apex_layer_norm and args.normalization == "LayerNorm"
    if args.apply_layernorm_1p and not apex_norm:
        raise ConfigError(
            f"--apply-layernorm-1p with --transformer-impl local and --normalization "
            f"{args.normalization}: the local spec's torch norms have no zero-centred gamma "
            "(apex's fused LayerNorm does); use --transformer-impl transformer_engine"
        )


def _validate_parallel_layout(args: argparse.Namespace) -> None:
    tp = args.tensor_model_parallel_size
    pp = args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    model_size = tp * pp * cp
    if args.world_size % model_size:
        raise ConfigError(
            f"world size {args.world_size} is not divisible by --tensor-model-parallel-size "
            f"{tp} x --pipeline-model-parallel-size {pp} x --context-parallel-size {cp} = "
            f"{model_size}"
        )
    args.data_parallel_size = args.world_size // model_size

    if args.num_layers % pp:
        raise ConfigError(
            f"--num-layers {args.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {pp}: every stage needs the same number of layers"
        )
    args.virtual_pipeline_model_parallel_size = None
    per_virtual = args.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None:
        if pp == 1:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {per_virtual} needs "
                "--pipeline-model-parallel-size > 1 (the interleaved schedule)"
            )
        per_stage = args.num_layers // pp
        if per_virtual < 1 or per_stage % per_virtual:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {per_virtual} must divide the "
                f"{per_stage} layers per pipeline stage (--num-layers {args.num_layers} / "
                f"--pipeline-model-parallel-size {pp})"
            )
        if per_stage // per_virtual > 1:
            args.virtual_pipeline_model_parallel_size = per_stage // per_virtual

    if args.sequence_parallel and tp == 1:
        warnings.warn(
            "--sequence-parallel has no effect with --tensor-model-parallel-size 1: disabled",
            stacklevel=3,
        )
        args.sequence_parallel = False
    if args.sequence_parallel and args.seq_length % tp:
        raise ConfigError(
            f"--sequence-parallel splits --seq-length {args.seq_length} over "
            f"--tensor-model-parallel-size {tp}: the sequence length (in TST phase 1 the "
            "latent length, the same L) must be a multiple of it"
        )
    if cp > 1 and args.seq_length % (2 * cp):
        raise ConfigError(
            f"--seq-length {args.seq_length} must be a multiple of 2 x --context-parallel-size "
            f"{cp} = {2 * cp} (load-balanced context parallelism splits it into 2*CP chunks; "
            "in TST phase 1 this is the latent length, the same L)"
        )
    if args.overlap_param_gather and not (
        args.use_distributed_optimizer and args.overlap_grad_reduce
    ):
        raise ConfigError(
            "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"
        )


def _validate_fsdp(args: argparse.Namespace, env: Environment) -> None:
    """``--use-torch-fsdp2`` / ``--use-megatron-fsdp`` with Megatron-LM's rules (its
    ``validate_args``), plus what this trainer cannot honour with them (named in each message)."""
    torch_fsdp, megatron_fsdp = args.use_torch_fsdp2, args.use_megatron_fsdp
    if not args.torch_fsdp2_reshard_after_forward and not torch_fsdp:
        raise ConfigError("--torch-fsdp2-no-reshard-after-forward needs --use-torch-fsdp2")
    if args.data_parallel_sharding_strategy != "no_shard" and not megatron_fsdp:
        raise ConfigError(
            f"--data-parallel-sharding-strategy {args.data_parallel_sharding_strategy} is "
            "Megatron-FSDP's: it needs --use-megatron-fsdp (torch FSDP2 always shards "
            "parameters, gradients and optimizer state)"
        )
    if not (torch_fsdp or megatron_fsdp):
        return
    if torch_fsdp and megatron_fsdp:
        raise ConfigError("--use-torch-fsdp2 and --use-megatron-fsdp are exclusive; give one")
    if torch_fsdp:
        _validate_torch_fsdp2(args)
    else:
        _validate_megatron_fsdp(args, env)


def _validate_torch_fsdp2(args: argparse.Namespace) -> None:
    rules = (
        (
            args.pipeline_model_parallel_size == 1,
            "--use-torch-fsdp2 is not supported with pipeline parallelism (got "
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}; need 1)",
        ),
        (
            args.expert_model_parallel_size == 1,
            "--use-torch-fsdp2 is not supported with expert parallelism (got "
            f"--expert-model-parallel-size {args.expert_model_parallel_size}; need 1: the "
            "experts are sharded over data parallel with the rest of their layer)",
        ),
        (
            not args.use_distributed_optimizer,
            "--use-torch-fsdp2 is not supported with Megatron-Core's distributed optimizer: "
            "drop --use-distributed-optimizer (FSDP2 already shards the optimizer state)",
        ),
        (
            not args.gradient_accumulation_fusion,
            "--use-torch-fsdp2 is not supported with gradient accumulation fusion: add "
            "--no-gradient-accumulation-fusion (as Megatron-LM requires)",
        ),
        (
            args.untie_embeddings_and_output_weights,
            "--use-torch-fsdp2 requires --untie-embeddings-and-output-weights (the tied "
            "weight would live in two FSDP units)",
        ),
        (not args.fp16, "--use-torch-fsdp2 is not supported with --fp16; use --bf16"),
        (
            not args.overlap_grad_reduce,
            "--overlap-grad-reduce is DDP's bucketed overlap; with --use-torch-fsdp2 each "
            "layer's reduce-scatter overlaps the backward by itself: drop the flag",
        ),
        (
            not args.calculate_per_token_loss,
            "--calculate-per-token-loss with --use-torch-fsdp2: FSDP2 averages the gradients "
            "over data parallel and Megatron-Core's TorchFullyShardedDataParallel cannot "
            "rescale them by the global token count (its scale_gradients is a no-op); drop "
            "the flag or use DDP",
        ),
    )
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)


def _validate_megatron_fsdp(args: argparse.Namespace, env: Environment) -> None:
    if not env.cuda:
        raise ConfigError(
            "--use-megatron-fsdp needs CUDA GPUs, and none is visible: Megatron-FSDP builds "
            "its parameter/gradient buffers and device meshes on CUDA devices. On CPUs use "
            "--use-torch-fsdp2 (PyTorch FSDP2 runs on gloo)"
        )
    if importlib.util.find_spec("einops") is None:
        raise ConfigError(
            "--use-megatron-fsdp needs einops, which is not installed (Megatron-Core builds "
            "Megatron-FSDP's data x tensor-parallel device mesh with it): pip install einops"
        )
    if not args.use_distributed_optimizer:
        raise ConfigError(
            "--use-megatron-fsdp needs --use-distributed-optimizer (Megatron-FSDP steps "
            "through Megatron-Core's distributed optimizer, as Megatron-LM sets it)"
        )
    for flag in ("save", "load"):
        if getattr(args, flag):
            raise ConfigError(
                f"--{flag} with --use-megatron-fsdp: Megatron-FSDP checkpoints are Megatron-"
                "LM's fsdp_dtensor format (--ckpt-format fsdp_dtensor), which this trainer "
                "does not write or read; use --use-torch-fsdp2 (torch_dist checkpoints) or "
                "DDP with --use-distributed-optimizer to save"
            )


def _validate_model_shape(args: argparse.Namespace) -> None:
    tp = args.tensor_model_parallel_size
    heads = args.num_attention_heads
    if heads % tp:
        raise ConfigError(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size "
            f"{tp}: each tensor-parallel rank must hold whole heads"
        )
    if args.num_query_groups is not None:
        args.group_query_attention = True
    elif args.group_query_attention:
        args.num_query_groups = 1
    else:
        args.num_query_groups = heads
    groups = args.num_query_groups
    if groups < 1 or heads % groups:
        raise ConfigError(
            f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}: "
            "every key/value group must serve the same number of query heads"
        )
    if groups % tp:
        raise ConfigError(
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size "
            f"{tp}: each tensor-parallel rank must hold whole key/value groups"
        )
    if args.kv_channels is None:
        if args.hidden_size % heads:
            raise ConfigError(
                f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                f"{heads}; give --kv-channels explicitly"
            )
        args.kv_channels = args.hidden_size // heads
    if args.ffn_hidden_size is None:
        if args.swiglu:
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        raise ConfigError(
            f"--max-position-embeddings {args.max_position_embeddings} is smaller than "
            f"--seq-length {args.seq_length}"
        )
    args.padded_vocab_size = None
    if args.vocab_size is not None:
        _check_positive(args, "vocab_size")
        args.padded_vocab_size = pad_vocab_size(
            args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )


def _validate_moe(args: argparse.Namespace, env: Environment) -> None:
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size
    if args.num_experts == 0:
        args.num_experts = None
    experts = args.num_experts
    _normalize_load_balancing(args)
    if experts is None:
        if ep > 1:
            raise ConfigError(f"--expert-model-parallel-size {ep} needs --num-experts")
        _refuse_moe_flags_without_experts(args)
        return
    if experts < 1:
        raise ConfigError(f"--num-experts must be >= 1 (or 0 for a dense model), got {experts}")
    if not 1 <= args.moe_router_topk <= experts:
        raise ConfigError(
            f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts "
            f"{experts}"
        )
    if experts % ep:
        raise ConfigError(
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}"
        )
    expert_model_size = ep * etp * args.pipeline_model_parallel_size
    if etp < 1 or args.world_size % expert_model_size:
        raise ConfigError(
            f"world size {args.world_size} is not divisible by --expert-model-parallel-size "
            f"{ep} x --expert-tensor-parallel-size {etp} x --pipeline-model-parallel-size "
            f"{args.pipeline_model_parallel_size} = {expert_model_size}"
        )
    if (
        args.moe_router_topk == 1
        and args.moe_router_score_function == "softmax"
        and not args.moe_router_pre_softmax
        and args.moe_router_load_balancing_type != "sinkhorn"
    ):
        raise ConfigError(
            "--moe-router-topk 1 with --moe-router-score-function softmax needs "
            "--moe-router-pre-softmax (a softmax over the one selected expert has zero gradient)"
        )
    if args.moe_grouped_gemm and args.transformer_impl == "local" and not env.grouped_gemm:
        if not args.transformer_impl_resolved:
            raise ConfigError(
                "--moe-grouped-gemm with --transformer-impl local needs the grouped_gemm package, "
                "which is not installed: install it (github.com/fanshiqing/grouped_gemm), use "
                "--transformer-impl transformer_engine, or drop --moe-grouped-gemm"
            )
        warnings.warn(
            "--moe-grouped-gemm: this machine runs --transformer-impl local (no Transformer "
            "Engine on a GPU) and has no grouped_gemm package: the experts run one by one "
            "(SequentialMLP) instead; same parameters, same checkpoint",
            stacklevel=3,
        )
        args.moe_grouped_gemm = False
    if args.moe_layer_freq < 1:
        raise ConfigError(f"--moe-layer-freq must be >= 1, got {args.moe_layer_freq}")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        raise ConfigError(
            f"--num-experts {experts} with --tensor-model-parallel-size "
            f"{args.tensor_model_parallel_size} needs --sequence-parallel (Megatron-Core's MoE "
            "layer refuses to train tensor-parallel without it)"
        )
    if args.moe_shared_expert_intermediate_size is not None and args.add_bias_linear:
        raise ConfigError(
            "--moe-shared-expert-intermediate-size needs --disable-bias-linear (Megatron-Core's "
            "shared experts have no biases)"
        )
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.add_bias_linear and etp > 1:
        raise ConfigError(
            f"--expert-tensor-parallel-size {etp} with linear biases: Megatron-Core's experts "
            "support biases only at expert-tensor-parallel size 1; pass --disable-bias-linear "
            "or --expert-tensor-parallel-size 1"
        )
    _validate_moe_routing(args)
    _validate_moe_capacity(args)
    _resolve_moe_speed_flags(args, env)


def _normalize_load_balancing(args: argparse.Namespace) -> None:
    """One load-balancing type and coefficient stay scalars (as Megatron-Core takes them);
    a combination of aux losses becomes two equally long lists."""
    types = _as_list(args.moe_router_load_balancing_type)
    coeffs = _as_list(args.moe_aux_loss_coeff)
    flag = "--moe-router-load-balancing-type " + " ".join(types)
    if len(set(types)) != len(types):
        raise ConfigError(f"{flag}: each type may appear once")
    if len(types) > 1 and not set(types) <= set(MOE_AUX_LOSS_TYPES):
        raise ConfigError(
            f"{flag}: only the aux losses ({', '.join(MOE_AUX_LOSS_TYPES)}) can be combined; "
            "sinkhorn and none stand alone"
        )
    if len(coeffs) != len(types):
        raise ConfigError(
            f"{flag} needs one --moe-aux-loss-coeff per type, got "
            f"{len(coeffs)}: {' '.join(str(c) for c in coeffs)}"
        )
    if any(coeff < 0 for coeff in coeffs):
        raise ConfigError(f"--moe-aux-loss-coeff must be >= 0, got {coeffs}")
    args.moe_router_load_balancing_type = types[0] if len(types) == 1 else types
    args.moe_aux_loss_coeff = coeffs[0] if len(coeffs) == 1 else coeffs


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _refuse_moe_flags_without_experts(args: argparse.Namespace) -> None:
    given = [
        flag
        for flag, on in (
            ("--moe-router-enable-expert-bias", args.moe_router_enable_expert_bias),
            ("--moe-expert-capacity-factor", args.moe_expert_capacity_factor is not None),
            ("--moe-pad-expert-input-to-capacity", args.moe_pad_expert_input_to_capacity),
            ("--moe-router-num-groups", args.moe_router_num_groups is not None),
            ("--moe-router-group-topk", args.moe_router_group_topk is not None),
            ("--moe-router-topk-scaling-factor", args.moe_router_topk_scaling_factor is not None),
            ("--moe-permute-fusion", bool(args.moe_permute_fusion)),
            ("--moe-grouped-gemm", args.moe_grouped_gemm),
        )
        if on
    ]
    if given:
        raise ConfigError(f"{', '.join(given)} need(s) a MoE model: give --num-experts")


def _validate_moe_routing(args: argparse.Namespace) -> None:
    experts, topk = args.num_experts, args.moe_router_topk
    sinkhorn = args.moe_router_load_balancing_type == "sinkhorn"
    if args.moe_router_enable_expert_bias:
        if args.moe_router_score_function != "sigmoid":
            raise ConfigError(
                "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                f"(got {args.moe_router_score_function}): Megatron-Core adds the expert bias "
                "to sigmoid scores only"
            )
        if args.moe_router_bias_update_rate <= 0:
            raise ConfigError(
                "--moe-router-bias-update-rate must be > 0 with --moe-router-enable-expert-bias, "
                f"got {args.moe_router_bias_update_rate}"
            )
    scaling = args.moe_router_topk_scaling_factor
    if scaling is not None and scaling <= 0:
        raise ConfigError(f"--moe-router-topk-scaling-factor must be > 0, got {scaling}")
    groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ConfigError(
            "group-limited routing needs both --moe-router-num-groups and "
            f"--moe-router-group-topk (got {groups} and {group_topk})"
        )
    if groups is not None:
        if groups < 1 or experts % groups:
            raise ConfigError(
                f"--moe-router-num-groups {groups} must divide --num-experts {experts}"
            )
        if not 1 <= group_topk <= min(groups, topk):
            raise ConfigError(
                f"--moe-router-group-topk {group_topk} must be between 1 and the smaller of "
                f"--moe-router-num-groups {groups} and --moe-router-topk {topk}"
            )
        if group_topk * (experts // groups) < topk:
            raise ConfigError(
                f"--moe-router-group-topk {group_topk} groups of {experts // groups} experts "
                f"(--num-experts {experts} / --moe-router-num-groups {groups}) hold fewer than "
                f"--moe-router-topk {topk} experts"
            )
    ignored_by_sinkhorn = [
        flag
        for flag, on in (
            ("--moe-router-enable-expert-bias", args.moe_router_enable_expert_bias),
            ("--moe-router-num-groups/--moe-router-group-topk", groups is not None),
            ("--moe-router-topk-scaling-factor", scaling is not None),
        )
        if on
    ]
    if sinkhorn and ignored_by_sinkhorn:
        raise ConfigError(
            "--moe-router-load-balancing-type sinkhorn routes by Sinkhorn-normalised scores "
            f"and ignores {', '.join(ignored_by_sinkhorn)}"
        )


def _validate_moe_capacity(args: argparse.Namespace) -> None:
    factor = args.moe_expert_capacity_factor
    if factor is None:
        if args.moe_pad_expert_input_to_capacity:
            raise ConfigError(
                "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor (the "
                "capacity it pads to)"
            )
        if args.moe_token_drop_policy != "probs":
            raise ConfigError(
                f"--moe-token-drop-policy {args.moe_token_drop_policy} needs "
                "--moe-expert-capacity-factor (without it no token is dropped)"
            )
        return
    if not math.isfinite(factor) or factor <= 0:
        raise ConfigError(
            f"--moe-expert-capacity-factor must be a finite number > 0, got {factor} (leave it "
            "out for dropless routing)"
        )
    if args.moe_router_load_balancing_type == "sinkhorn":
        raise ConfigError(
            f"--moe-expert-capacity-factor {factor} does not work with "
            "--moe-router-load-balancing-type sinkhorn (Megatron-Core drops tokens only with "
            "aux_loss, seq_aux_loss, global_aux_loss or none)"
        )


def _resolve_moe_speed_flags(args: argparse.Namespace, env: Environment) -> None:
    """``moe_permute_fusion`` (auto: on where Transformer Engine's kernels run) and the router
    precision (``--moe-router-dtype none`` -> None)."""
    if args.moe_router_dtype == "none":
        args.moe_router_dtype = None
    available = args.transformer_impl == "transformer_engine" and env.cuda and env.fused_permute
    if args.moe_permute_fusion is None:
        args.moe_permute_fusion = available
    elif args.moe_permute_fusion and not available:
        raise ConfigError(
            "--moe-permute-fusion needs Transformer Engine >= 2.1's fused permutation kernels "
            "on a GPU (--transformer-impl transformer_engine); this run has "
            f"--transformer-impl {args.transformer_impl}"
            f"{'' if env.cuda else ' and no GPU'}: drop the flag"
        )


def _validate_recompute(args: argparse.Namespace, env: Environment) -> None:
    """Megatron-LM's recompute flags, checked before Megatron-Core asserts on them."""
    granularity, method, num = (
        args.recompute_granularity,
        args.recompute_method,
        args.recompute_num_layers,
    )
    if args.recompute_activations:
        if granularity == "full":
            raise ConfigError(
                "--recompute-activations means --recompute-granularity selective; it cannot be "
                "combined with --recompute-granularity full"
            )
        granularity = args.recompute_granularity = "selective"
    if granularity is None and (method is not None or num is not None):
        raise ConfigError(
            "--recompute-method/--recompute-num-layers need --recompute-granularity full"
        )
    if granularity == "full":
        if method is None or num is None:
            raise ConfigError(
                "--recompute-granularity full needs --recompute-method (uniform or block) and "
                "--recompute-num-layers"
            )
        per_stage = args.num_layers // args.pipeline_model_parallel_size
        per_chunk = args.num_layers_per_virtual_pipeline_stage or per_stage
        if not 1 <= num <= per_chunk:
            raise ConfigError(
                f"--recompute-num-layers {num} must be between 1 and the {per_chunk} layers of "
                "a pipeline stage (or virtual stage)"
            )
    if granularity == "selective" and method is not None:
        raise ConfigError(
            f"--recompute-method {method} applies only to --recompute-granularity full, not "
            "selective"
        )
    if granularity == "selective" and num is not None:
        raise ConfigError(
            f"--recompute-num-layers {num} applies only to --recompute-granularity full "
            "(selective recomputation covers every layer)"
        )
    modules = args.recompute_modules
    if modules is None:
        return
    if granularity != "selective":
        raise ConfigError(
            "--recompute-modules needs selective recomputation (--recompute-activations or "
            "--recompute-granularity selective)"
        )
    if not modules:
        raise ConfigError("--recompute-modules needs at least one module")
    moe_layers = args.num_experts is not None
    unusable = {
        "moe_act": (not args.moe_grouped_gemm, "needs --moe-grouped-gemm (and a kernel for it)"),
        "moe": (not moe_layers, "needs --num-experts"),
        "shared_experts": (
            args.moe_shared_expert_intermediate_size is None,
            "needs --moe-shared-expert-intermediate-size",
        ),
        "mlp": (moe_layers and args.moe_layer_freq == 1, "has no dense MLP (every layer is MoE)"),
    }
    for module in modules:
        refused, why = unusable.get(module, (False, ""))
        if refused:
            raise ConfigError(f"--recompute-modules {module}: {why}")
        if module in ("layernorm", "moe_act") and not env.transformer_engine:
            raise ConfigError(
                f"--recompute-modules {module} needs Transformer Engine (Megatron-Core's "
                "output-discarding checkpoint, tensor_parallel/random.py CheckpointWithoutOutput, "
                f"uses it unconditionally): {TE_INSTALL_HINT} or recompute other modules"
            )


def _validate_timing_and_memory(args: argparse.Namespace) -> None:
    if args.manual_gc_interval < 0:
        raise ConfigError(f"--manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    if not args.manual_gc and (args.manual_gc_interval or not args.manual_gc_eval):
        raise ConfigError("--manual-gc-interval/--no-manual-gc-eval need --manual-gc")
    if args.log_timers_to_tensorboard and not (args.tensorboard_dir or args.wandb_project):
        raise ConfigError(
            "--log-timers-to-tensorboard needs --tensorboard-dir (or --wandb-project)"
        )


def _validate_batch(args: argparse.Namespace) -> None:
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    _check_positive(args, "global_batch_size")
    if args.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
            f"{args.data_parallel_size} = {per_step}"
        )
    _validate_interleaved_microbatches(args, per_step)
    if args.rampup_batch_size is None:
        return
    start, increment, samples = args.rampup_batch_size
    name = f"--rampup-batch-size {start} {increment} {samples}"
    if start < 1 or increment < 1 or samples < 0:
        raise ConfigError(f"{name}: START and INCREMENT must be >= 1 and SAMPLES >= 0")
    for label, value in (("START", start), ("INCREMENT", increment)):
        if value % per_step:
            raise ConfigError(
                f"{name}: {label} {value} is not divisible by --micro-batch-size "
                f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = "
                f"{per_step}"
            )
    if start > args.global_batch_size or (args.global_batch_size - start) % increment:
        raise ConfigError(
            f"{name}: --global-batch-size {args.global_batch_size} must be START plus a "
            "whole number of INCREMENTs"
        )


def _validate_interleaved_microbatches(args: argparse.Namespace, per_step: int) -> None:
    """The interleaved schedule runs micro-batches in groups of the pipeline size."""
    pp = args.pipeline_model_parallel_size
    if not args.virtual_pipeline_model_parallel_size:
        return
    counts = {"--global-batch-size": args.global_batch_size // per_step}
    if args.eval_iters:
        counts["--eval-iters"] = args.eval_iters
    for flag, count in counts.items():
        if count % pp:
            raise ConfigError(
                f"the interleaved pipeline schedule (--num-layers-per-virtual-pipeline-stage) "
                f"needs a number of micro-batches divisible by --pipeline-model-parallel-size "
                f"{pp}; {flag} gives {count} per step"
            )


def _validate_learning_rate(args: argparse.Namespace) -> None:
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _check_positive(args, "lr_decay_iters")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ConfigError(
                f"give either --lr-warmup-fraction {args.lr_warmup_fraction} or "
                f"--lr-warmup-iters {args.lr_warmup_iters}, not both"
            )
        if not 0.0 <= args.lr_warmup_fraction < 1.0:
            raise ConfigError(
                f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}"
            )
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    if not 0 <= args.lr_warmup_iters < args.lr_decay_iters:
        raise ConfigError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be >= 0 and smaller than "
            f"--lr-decay-iters {args.lr_decay_iters}"
        )
    if args.lr_decay_style == "WSD":
        wsd = args.lr_wsd_decay_iters
        if wsd is None:
            raise ConfigError(
                "--lr-decay-style WSD needs --lr-wsd-decay-iters (the length of the final decay)"
            )
        if not 0 < wsd <= args.lr_decay_iters - args.lr_warmup_iters:
            raise ConfigError(
                f"--lr-wsd-decay-iters {wsd} must be in [1, --lr-decay-iters "
                f"{args.lr_decay_iters} - warmup {args.lr_warmup_iters}]"
            )
    if args.weight_decay_incr_style == "constant":
        if args.start_weight_decay is not None or args.end_weight_decay is not None:
            raise ConfigError(
                "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style "
                "linear or cosine (with constant, --weight-decay applies throughout)"
            )
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    elif args.start_weight_decay is None or args.end_weight_decay is None:
        raise ConfigError(
            f"--weight-decay-incr-style {args.weight_decay_incr_style} needs "
            "--start-weight-decay and --end-weight-decay"
        )


def _validate_data(args: argparse.Namespace) -> None:
    per_split = any((args.train_data_path, args.valid_data_path, args.test_data_path))
    sources = [
        name
        for name, given in (
            ("--data-path", bool(args.data_path)),
            ("--train-data-path/--valid-data-path/--test-data-path", per_split),
            ("--mock-data", args.mock_data),
        )
        if given
    ]
    if len(sources) != 1:
        raise ConfigError(
            "give exactly one data source: --data-path, --train-data-path (with optional "
            "--valid-data-path/--test-data-path), or --mock-data; got "
            + (" and ".join(sources) if sources else "none")
        )
    if per_split and not args.train_data_path:
        raise ConfigError("--valid-data-path/--test-data-path need --train-data-path as well")
    if args.tokenizer_type is None:
        if args.vocab_size is None:
            raise ConfigError(
                f"give --tokenizer-type ({', '.join(TOKENIZER_TYPES)}) "
                "or --vocab-size (which implies NullTokenizer)"
            )
        args.tokenizer_type = "NullTokenizer"
    try:
        tokenizer_spec(args).check()
    except TokenizerError as err:
        raise ConfigError(str(err)) from None
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    _validate_document_masking(args)


def _validate_document_masking(args: argparse.Namespace) -> None:
    """``--reset-position-ids`` / ``--reset-attention-mask`` combinations that cannot work."""
    if args.reset_attention_mask and args.context_parallel_size > 1:
        raise ConfigError(
            "--reset-attention-mask cannot be combined with --context-parallel-size "
            f"{args.context_parallel_size}: context-parallel attention (Transformer Engine's "
            "ring attention) takes no arbitrary document mask; use --context-parallel-size 1 "
            "or drop --reset-attention-mask"
        )
    if args.reset_attention_mask and args.transformer_impl == "transformer_engine":
        warnings.warn(
            "--reset-attention-mask with Transformer Engine: self-attention takes the document "
            "mask as attn_mask_type 'arbitrary', which Transformer Engine runs with its unfused "
            "attention (its flash/cuDNN kernels take no arbitrary mask): slower, and "
            "[b, heads/TP, L, L] scores in memory",
            stacklevel=3,
        )
    if args.reset_attention_mask and not args.create_attention_mask_in_dataloader:
        raise ConfigError(
            "--reset-attention-mask needs the document mask that "
            "--no-create-attention-mask-in-dataloader turns off (in Megatron-LM the pair trains "
            "without document masking); drop one of the two"
        )
    kind = args.position_embedding_type
    if args.reset_position_ids and kind != "learned_absolute" and not args.reset_attention_mask:
        raise ConfigError(
            f"--reset-position-ids has no effect with --position-embedding-type {kind}: "
            "Megatron-Core's rotary embedding takes positions 0..L-1 from the sequence, not "
            "from position ids (Megatron-LM ignores the flag silently). To keep documents "
            "apart add --reset-attention-mask (with RoPE the restart is then implied: "
            "attention only sees relative positions within a document)"
        )


def _validate_checkpointing(args: argparse.Namespace) -> None:
    if args.ckpt_format not in CKPT_FORMATS:
        raise ConfigError(
            f"--ckpt-format {args.ckpt_format} is not supported; only torch_dist "
            "(Megatron-Core distributed checkpoints) is"
        )
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError(
            f"--save-interval must be >= 1 (got {args.save_interval}); leave it out to save "
            "only at the end of the run and on exit signals"
        )
    if args.ckpt_keep_last < 0:
        raise ConfigError(
            f"--ckpt-keep-last must be >= 0 (0 = keep all), got {args.ckpt_keep_last}"
        )
    for dest in ("async_save", "override_save_lock"):
        if getattr(args, dest) and not args.save:
            raise ConfigError(f"--{dest.replace('_', '-')} needs --save (it acts on saving)")
    if args.use_persistent_ckpt_worker and not args.async_save:
        raise ConfigError(
            "--use-persistent-ckpt-worker writes --async-save checkpoints: it needs --async-save"
        )
    if args.async_save and not args.use_persistent_ckpt_worker:
        args.async_save = False  # Megatron-LM's rule: no writer forked from a CUDA/NCCL rank
        args.startup_notes.append(
            "--async-save is not supported without --use-persistent-ckpt-worker (as in "
            "Megatron-LM): disabling --async-save, checkpoints are written synchronously"
        )
    resume_flags = (
        "tst_allow_schedule_change", "override_opt_param_scheduler",
        "use_checkpoint_opt_param_scheduler",
    )  # fmt: skip
    for dest in resume_flags:
        if getattr(args, dest) and not args.load:
            raise ConfigError(
                f"--{dest.replace('_', '-')} acts on a resume: it needs --load"
            )
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError(
            "give either --override-opt_param-scheduler (this run's schedule) or "
            "--use-checkpoint-opt_param-scheduler (the checkpoint's), not both"
        )


def _validate_logging(args: argparse.Namespace, env: Environment) -> None:
    for dest in ("log_interval", "eval_interval"):
        _check_positive(args, dest)
    if args.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.peak_tflops is None:
        args.peak_tflops = env.peak_tflops
    _check_logging_outputs(args)


LOGGING_PACKAGES = {"tensorboard_dir": "tensorboard", "wandb_project": "wandb"}


def _check_logging_outputs(args: argparse.Namespace) -> None:
    """The logging outputs can be opened: their packages are installed, and no part of a
    ``--metrics-jsonl`` / ``--tensorboard-dir`` path is a regular file."""
    for dest, package in LOGGING_PACKAGES.items():
        if getattr(args, dest, None) and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"--{dest.replace('_', '-')} {getattr(args, dest)} needs the {package} "
                f"package, which is not installed: pip install {package}, or drop the flag"
            )
    for dest in ("metrics_jsonl", "tensorboard_dir"):
        path = getattr(args, dest, None)
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path)) if dest == "metrics_jsonl" else path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ConfigError(
                f"--{dest.replace('_', '-')} {path}: {parent} is a file, not a directory"
            )


def _validate_tst(args: argparse.Namespace) -> None:
    bag = args.tst_bag_size
    fraction = args.tst_phase1_fraction
    iters = args.tst_phase1_iters
    if bag < 1:
        raise ConfigError(f"--tst-bag-size must be >= 1 (1 = TST off), got {bag}")
    if fraction is not None and iters is not None:
        raise ConfigError(
            f"give either --tst-phase1-fraction {fraction} or --tst-phase1-iters {iters}, not both"
        )
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"--tst-phase1-fraction must be in the open interval (0, 1), got {fraction}"
        )
    if iters is not None and not 1 <= iters <= args.train_iters:
        raise ConfigError(
            f"--tst-phase1-iters {iters} must be between 1 and --train-iters {args.train_iters}"
        )
    if bag > 1 and iters == args.train_iters:
        raise ConfigError(
            f"--tst-phase1-iters {iters} equals --train-iters {args.train_iters}: no phase 2 "
            "(plain next-token training) would follow, and phase 1 alone ends 1.5-3.5 nats "
            "worse (the report's r = 1.0; a --tst-phase1-fraction of 1 is refused too). "
            "Give fewer phase-1 iterations (the report's good range is r = 0.2-0.4 of "
            "--train-iters)"
        )
    if bag > args.seq_length:
        raise ConfigError(
            f"--tst-bag-size {bag} exceeds --seq-length {args.seq_length}: a phase-1 sample "
            f"would read {bag} x ({args.seq_length} + 1) tokens and the bag statistics take "
            "micro-batch x seq-length x bag-size^2 bytes. Reported bag sizes are 3-16"
        )
    if bag > 1 and fraction is None and iters is None:
        raise ConfigError(
            f"--tst-bag-size {bag} turns TST on: also give the phase-1 length, "
            "--tst-phase1-fraction r in (0, 1) (e.g. 0.3) or --tst-phase1-iters N"
        )
    if args.tst_phase != "auto" and bag == 1:
        raise ConfigError(
            f"--tst-phase {args.tst_phase} needs TST on (--tst-bag-size > 1 and the phase-1 "
            "length that the two jobs share); got --tst-bag-size 1"
        )
    if args.tst_phase == "2" and args.load is None:
        raise ConfigError(
            "--tst-phase 2 continues from the phase-1 checkpoint: give --load with its directory"
        )
    if bag > 1 and fraction is not None and int(fraction * args.train_iters) == 0:
        raise ConfigError(
            f"--tst-phase1-fraction {fraction} x --train-iters {args.train_iters} = "
            f"{fraction * args.train_iters:g} rounds down to 0 phase-1 iterations: TST would be "
            "off. Give a larger fraction, --tst-phase1-iters N (N >= 1), or --tst-bag-size 1 "
            "for a baseline run"
        )
    _validate_tst_fold(args)
    explicit = tuple(args.tst_bag_weights) if args.tst_bag_weights is not None else None
    try:  # the bag-loss weighting is checked by TSTConfig (its messages name the flags)
        args.tst = TSTConfig(
            bag_size=bag,
            mode=args.tst_mode,
            phase1_fraction=fraction,
            phase1_iters=iters,
            fold=args.tst_fold,
            bag_weighting=args.tst_bag_weighting,
            bag_weights=explicit,
        )
    except TSTConfigError as err:
        raise ConfigError(str(err)) from None


def _validate_tst_fold(args: argparse.Namespace) -> None:
    """``--tst-fold batch``: phase 1's ``L/s`` latent positions split like ``L`` does."""
    if args.tst_fold == "sequence":
        return
    bag, seq = args.tst_bag_size, args.seq_length
    if bag == 1:
        raise ConfigError(
            f"--tst-fold {args.tst_fold} needs TST on (--tst-bag-size > 1); got --tst-bag-size 1"
        )
    if args.tst_mode == "output-only":
        raise ConfigError(
            "--tst-fold batch splits the s-token input bags of a phase-1 sample over s samples; "
            "--tst-mode output-only reads one token per position (no bags, no extra data): "
            "drop --tst-fold batch (or use --tst-mode full / input-only)"
        )
    if seq % bag:
        raise ConfigError(
            f"--tst-fold batch splits --seq-length {seq} into phase-1 samples of L/s latent "
            f"positions: it must be a multiple of --tst-bag-size {bag}"
        )
    latent = seq // bag
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    if args.sequence_parallel and latent % tp:
        raise ConfigError(
            f"--tst-fold batch: --sequence-parallel splits the {latent} phase-1 latent "
            f"positions (--seq-length {seq} / --tst-bag-size {bag}) over "
            f"--tensor-model-parallel-size {tp}: L/s must be a multiple of it"
        )
    if cp > 1 and latent % (2 * cp):
        raise ConfigError(
            f"--tst-fold batch: the {latent} phase-1 latent positions (--seq-length {seq} / "
            f"--tst-bag-size {bag}) must be a multiple of 2 x --context-parallel-size {cp} = "
            f"{2 * cp} (load-balanced context parallelism splits them into 2*CP chunks)"
        )
    if args.fp8 is not None:
        split = cp * (tp if args.sequence_parallel else 1)
        tokens = latent // split * bag * args.micro_batch_size
        multiple = fp8_token_multiple(args.fp8_recipe)
        if tokens % multiple:
            raise ConfigError(
                f"--tst-fold batch with --fp8-format {args.fp8} --fp8-recipe "
                f"{args.fp8_recipe}: a phase-1 micro-batch puts {tokens} tokens per rank into "
                f"each GEMM (L/s = {latent} / {split} x s*b = {bag * args.micro_batch_size}); "
                f"Transformer Engine's FP8 GEMMs with this recipe need a multiple of {multiple}"
            )


def fp8_token_multiple(recipe: str) -> int:
    """What an FP8 GEMM's token dimension must divide by: 32 for MXFP8 (Transformer Engine's
    ``MXFP8Quantizer`` scales blocks of 32), 16 for the other recipes (Megatron-Core's
    `get_fp8_align_size`)."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    return get_fp8_align_size(Fp8Recipe(recipe))


def _validate_fusions(args: argparse.Namespace, env: Environment) -> None:
    te_loss = args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te"
    if te_loss and not env.transformer_engine:
        raise ConfigError(
            "--cross-entropy-fusion-impl te needs Transformer Engine, which is not "
            f"installed: {TE_INSTALL_HINT} or use --cross-entropy-fusion-impl native"
        )
    pp = args.pipeline_model_parallel_size
    if (
        args.virtual_pipeline_model_parallel_size is not None
        and not args.overlap_p2p_comm
        and args.distributed_backend == "nccl"
        and pp <= 2
    ):
        raise ConfigError(
            "--no-overlap-p2p-communication with the interleaved pipeline schedule batches "
            "each step's sends and receives, which needs --pipeline-model-parallel-size > 2 "
            f"(got {pp}: the previous and next stage are the same rank and batched messages "
            "would cross, as Megatron-LM asserts); drop --no-overlap-p2p-communication"
        )
    args.fusions, notes = fusions.resolve_fusions(
        requested_fusions(args),
        env.kernels,
        transformer_impl=args.transformer_impl,
        normalization=args.normalization,
    )
    args.startup_notes.extend(notes)


def _validate_reliability(args: argparse.Namespace) -> None:
    if args.max_bad_steps < 1:
        raise ConfigError(f"--max-bad-steps must be >= 1, got {args.max_bad_steps}")
    if args.collective_timeout_s is None:
        args.collective_timeout_s = 60.0 * args.distributed_timeout_minutes
    if args.collective_timeout_s <= 0:
        raise ConfigError(f"--collective-timeout-s must be > 0, got {args.collective_timeout_s}")
    for dest in ("exit_duration_in_mins", "exit_interval"):
        _check_positive(args, dest)
    if isinstance(args.exit_signal, str):
        args.exit_signal = signal.Signals[args.exit_signal]


def tokenizer_spec(args: argparse.Namespace) -> TokenizerSpec:
    """The tokenizer of ``pretrain_tst.py``-style flags (``--tokenizer-type`` ...)."""
    return TokenizerSpec(
        args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size
    )
