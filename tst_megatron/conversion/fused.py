"""Megatron-Core's fused projections <-> the separate Hugging Face ones.

* ``linear_qkv`` (weight ``[ng * (nh/ng + 2) * d, h]`` or bias ``[ng * (nh/ng + 2) * d]``) is
  interleaved per key/value group g: the rows of g's ``nh/ng`` query heads, then k_g, then v_g
  (``SelfAttention.get_query_key_value_tensors`` views it as ``[..., ng, (nh/ng + 2) * d]``).
  Query head j belongs to group ``j // (nh/ng)``, the same head order as HF's ``repeat_kv``.
* ``linear_fc1`` of a SwiGLU MLP (weight ``[2f, h]`` or bias ``[2f]``) is ``[gate; up]``:
  the MLP computes ``silu(x[..., :f]) * x[..., f:]``.
"""

from __future__ import annotations

import torch


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``[ng * (nh/ng + 2) * d, ...]`` -> q ``[nh * d, ...]``, k, v ``[ng * d, ...]``."""
    per_group = num_heads // num_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *rest),
        k.reshape(num_groups * head_dim, *rest),
        v.reshape(num_groups * head_dim, *rest),
    )


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    """q ``[nh * d, ...]``, k, v ``[ng * d, ...]`` -> fused ``[ng * (nh/ng + 2) * d, ...]``."""
    rest = q.shape[1:]
    q = q.reshape(num_groups, -1, *rest)
    k = k.reshape(num_groups, -1, *rest)
    v = v.reshape(num_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU ``linear_fc1`` ``[2f, ...]`` -> gate ``[f, ...]``, up ``[f, ...]``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate ``[f, ...]``, up ``[f, ...]`` -> SwiGLU ``linear_fc1`` ``[2f, ...]``."""
    return torch.cat([gate, up], dim=0)
