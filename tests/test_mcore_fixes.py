"""Megatron-Core fixes that GPUs need too apply without the CPU shim.

The MoE router of Megatron-Core 0.16.1 references ``te_general_gemm``, which is bound only
when Transformer Engine imports: without TE every MoE forward raises ``NameError`` on any
device (0.19 binds it to None: there the fix is a no-op and the layer runs unfixed too).
A fresh interpreter (no shim, TE absent) builds mcore's MoE layer from the local spec,
shows the bug, applies `tst_megatron.mcore_fixes.apply_mcore_fixes` and runs forward and
backward. The only stand-in is ``torch.cuda.current_device`` (the router moves its weight to
"the current GPU"; a CPU-only torch has none); it is not part of the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.transformer_config import TransformerConfig

from tst_megatron.cpu.shim import cpu_shim_installed
from tst_megatron.kernels import KernelAvailability
from tst_megatron.layers.spec import local_layer_spec
from tst_megatron.mcore_compat import TE_GEMM_UNBOUND_WITHOUT_TE, build_mlp
from tst_megatron.mcore_fixes import apply_mcore_fixes
from tst_megatron.training.model_builder import single_process_parallel_state

assert not cpu_shim_installed() and not KernelAvailability.detect().transformer_engine
assert hasattr(moe_utils, "te_general_gemm") != TE_GEMM_UNBOUND_WITHOUT_TE, "unexpected binding"
print("UNBOUND:", TE_GEMM_UNBOUND_WITHOUT_TE)
torch.cuda.current_device = lambda: torch.device("cpu")
config = TransformerConfig(
    num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
    num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
    moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=1e-2, add_bias_linear=False, gated_linear_unit=True,
    activation_func=F.silu, use_cpu_initialization=True, bias_activation_fusion=False,
    bias_dropout_fusion=False, masked_softmax_fusion=False,
    gradient_accumulation_fusion=False,
)
with single_process_parallel_state():
    spec = local_layer_spec(
        num_experts=4, moe_grouped_gemm=False, qk_layernorm=False,
        normalization="RMSNorm", apex=False,
    )
    layer = build_mlp(spec.submodules.mlp, config)
    x = torch.randn(8, 2, 32, requires_grad=True)
    try:
        layer(x)
        print("UNFIXED: ran")
    except NameError as err:
        print("UNFIXED: NameError", err)
    apply_mcore_fixes()
    out, _ = layer(x)
    out.sum().backward()
    grads = [x.grad, layer.router.weight.grad]
    ok = all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    print("FIXED:", tuple(out.shape), "grads ok" if ok else "grads bad")
"""


def test_moe_layer_runs_without_te_and_without_the_cpu_shim():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    if "UNBOUND: True" in proc.stdout:  # 0.16.1: the bug shows, the fix mends it
        assert "UNFIXED: NameError name 'te_general_gemm' is not defined" in proc.stdout
    else:  # 0.19: fixed upstream (tst_megatron.mcore_compat), the fix is a no-op
        assert "UNBOUND: False" in proc.stdout and "UNFIXED: ran" in proc.stdout
    assert "FIXED: (8, 2, 32) grads ok" in proc.stdout
