"""Norms for the local spec that support sequence parallelism, on any device.

Megatron-Core's local norm without apex (``transformer/torch_norm.py`` ``WrappedTorchNorm``)
asserts ``not config.sequence_parallel``, so the local spec could not run tensor-parallel MoE
(which needs SP) or any SP model. `TorchNorm` is the same torch ``LayerNorm``/``RMSNorm``
whose parameters are marked ``sequence_parallel = True`` under SP: each TP rank normalises its
own sequence shard ``[s/tp, b, h]`` with replicated weights, and ``finalize_model_grads``
(distributed/finalize_model_grads.py) sums the partial weight gradients over TP.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["QKNorm", "TorchNorm"]


class TorchNorm:
    """Factory: torch ``RMSNorm``/``LayerNorm`` over ``[s, b, h]``, picked by ``config``.

    Takes the keyword arguments ``build_module`` passes to mcore norms. ``persist_layer_norm``
    is an apex kernel option and is ignored (the builder resolves it off for this norm).
    """

    sequence_sharded_input = True

    def __new__(  # type: ignore[misc]  # a factory: the class builds a torch norm
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("TorchNorm: zero-centered gamma is not supported")
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"TorchNorm: unsupported normalization {config.normalization!r}")
        if cls.sequence_sharded_input and config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True  # type: ignore[attr-defined]  # mcore's marker
        return norm


class QKNorm(TorchNorm):
    """Query/key norm over ``[s, b, heads, head_dim]``; its input is never sequence-sharded.

    ``finalize_model_grads`` sums ``q_layernorm``/``k_layernorm`` gradients over TP by name,
    so the parameters are not marked ``sequence_parallel``.
    """

    sequence_sharded_input = False
