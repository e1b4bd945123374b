"""The example configs (examples/configs/) and the launch scripts that use them."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml

from tst_megatron.training.arguments import parse_args, validate_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))
TST = [path for path in ALL if not path.stem.endswith("-baseline")]
SCRIPTS = [*sorted((ROOT / "examples" / "slurm").glob("*")), ROOT / "examples" / "gpu_check.sh"]

# name: (bag size s, phase-1 fraction r, seq length, vocabulary, layers, hidden, heads, groups)
EXPECTED = {
    "tst-270m": (4, 0.3, 2048, 128256, 30, 576, 9, 3),
    "tst-600m": (6, 0.3, 2048, 128256, 32, 960, 15, 5),
    "tst-3b": (6, 0.3, 4096, 128256, 36, 2048, 16, 4),
    "tst-10b-a1b": (16, 0.25, 4096, 128256, 28, 1024, 16, 4),
    "tst-30b-a3b": (16, 0.25, 4096, 151936, 48, 2048, 32, 4),
}


def validated(path: Path, world_size: int = 8):
    args = parse_args(["--yaml-config", str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validate_args(args, world_size)
    return args


def test_every_model_has_a_config_and_a_twin():
    assert sorted(path.stem for path in TST) == sorted(EXPECTED)
    assert sorted(path.stem for path in ALL) == sorted(
        [*EXPECTED, *(f"{name}-baseline" for name in EXPECTED)]
    )


@pytest.mark.parametrize("path", ALL, ids=lambda path: path.stem)
def test_config_validates(path):
    """Every config is valid pretrain_tst.py input for one 8-GPU node (TP=PP=1)."""
    args = validated(path)
    assert args.bf16 and args.optimizer == "adam" and args.lr_decay_style == "WSD"
    assert args.position_embedding_type == "rope" and args.normalization == "RMSNorm"
    assert args.swiglu and not args.add_bias_linear
    assert args.data_path and args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.global_batch_size % (args.micro_batch_size * args.data_parallel_size) == 0


@pytest.mark.parametrize("path", TST, ids=lambda path: path.stem)
def test_tst_settings_and_shape(path):
    bag, fraction, seq, vocab, layers, hidden, heads, groups = EXPECTED[path.stem]
    args = validated(path)
    assert (args.tst.bag_size, args.tst.phase1_fraction, args.tst.mode) == (bag, fraction, "full")
    assert (args.seq_length, args.vocab_size) == (seq, vocab)
    assert (args.num_layers, args.hidden_size) == (layers, hidden)
    assert (args.num_attention_heads, args.num_query_groups) == (heads, groups)
    # SmolLM3 ties its embeddings; the others are untied.
    assert args.untie_embeddings_and_output_weights == (path.stem != "tst-3b")
    if args.num_experts:
        assert args.qk_layernorm and args.num_experts == 128 and args.moe_router_topk == 8


def test_30b_a3b_is_qwen3_30b_a3b():
    args = validated(CONFIGS / "tst-30b-a3b.yaml")
    assert (args.kv_channels, args.moe_ffn_hidden_size, args.norm_epsilon) == (128, 768, 1e-6)
    assert args.moe_shared_expert_intermediate_size is None


@pytest.mark.parametrize("path", TST, ids=lambda path: path.stem)
def test_baseline_twin_differs_only_in_tst_keys(path):
    tst = yaml.safe_load(path.read_text())
    baseline = yaml.safe_load(path.with_name(f"{path.stem}-baseline.yaml").read_text())
    assert {key for key in tst if key.startswith("tst-")} == {
        "tst-bag-size",
        "tst-phase1-fraction",
        "tst-mode",
    }
    assert {k: v for k, v in tst.items() if not k.startswith("tst-")} == baseline
    assert validated(path.with_name(f"{path.stem}-baseline.yaml")).tst.bag_size == 1


# ------------------------------------------------------------------ launch scripts ----------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_syntax_and_config_paths(script):
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    subprocess.run(["bash", "-n", str(script)], check=True)
    for config in re.findall(r"examples/configs/[\w.-]+\.yaml", script.read_text()):
        assert (ROOT / config).is_file(), f"{script.name} names a missing {config}"
