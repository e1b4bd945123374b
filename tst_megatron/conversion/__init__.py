"""Megatron-Core `torch_dist` checkpoints <-> Hugging Face model directories.

One concern per module:

* `fused`: Megatron's fused QKV (interleaved per key/value group) and SwiGLU ``[gate; up]``.
* `spec`: what the target classes can express of the model section (`settings.ModelConfig`,
  the one model description), the class it becomes, and its settings back (``model.yaml``).
* `hf_config`: `ModelConfig` <-> ``config.json`` of LlamaForCausalLM, Qwen3ForCausalLM,
  Qwen3MoeForCausalLM.
* `hf_llama`: parameter names and layouts of the Llama family (embeddings, norms, attention
  with optional QK-norm, dense SwiGLU MLP).
* `hf_qwen3_moe`: parameter names and layouts of the Qwen3-MoE router and experts.
* `weights`: whole-model state dicts, Megatron (TP=PP=1) <-> Hugging Face.
* `safetensors_io`: reading and writing (sharded) ``model*.safetensors``.
* `megatron_io`: loading a checkpoint saved at any layout into one process, and saving a state
  dict as a checkpoint ``pretrain_tst.py`` loads, for the single-process settings
  (`training.tool_flags.single_process_settings`: the run's flags, completed from the record).
"""


class ConversionError(ValueError):
    """The checkpoint, directory or configuration cannot be converted (message says why)."""
