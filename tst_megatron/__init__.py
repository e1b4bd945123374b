"""Token Superposition Training (TST) on Megatron-Core.

Modules by concern: `config` (TST settings and phase layouts), `bags` (input-side bag
averaging), `loss` (vocab-parallel multi-hot cross-entropy), `targets` (sample layout per
mode), `model` (`TSTGPTModel`), `data` (tokenizers, token stream, validation sets),
`training` (arguments, loop, checkpoints, faults, metrics), `cpu` (the CPU/gloo shim, for
tests and CPU runs only), `testing` (multi-rank launcher), `conversion` (Hugging Face export).
"""

__version__ = "0.1.0"
