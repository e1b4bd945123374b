"""tools/convert_checkpoint.py and tools/evaluate.py on CPU.

Slow part: two tiny models are trained with TST through phase 2 by real ``pretrain_tst.py``
launches (mock data, NullTokenizer with 500 tokens, so the padded vocabulary of 512 is trimmed)
- dense Llama-style with untied embeddings at TP=2 (sequence parallel) and MoE with QK-norm and
tied embeddings at PP=2 - then exported to Hugging Face; the transformers models must give the
Megatron model's logits (1e-4, fp32) and greedy continuation, and ``evaluate.py`` at another
layout the single-process Megatron loss. Random HF Llama (biases, tied), Qwen3 (head_dim !=
hidden/heads) and Qwen3-MoE models go to Megatron (same logits) and back (identical tensors).

Megatron forwards run in one-rank CPU processes (`run_single`, which installs the CPU shim
there, never in pytest's process). Refusals are checked in-process: all but the unreadable
weights happen before any weight is read, so the fast ones use hand-made
``tst_checkpoint.json`` files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support.multirank import run_single

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"  # its tokenizer.json has 8192 tokens, <|endoftext|> = 0
VOCAB, SEQ = 500, 32
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--seq-length", str(SEQ), "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
]  # fmt: skip
MODELS = {
    "dense": [*TINY, "--untie-embeddings-and-output-weights", "--rotary-base", "5000",
              "--norm-epsilon", "1e-6", "--tensor-model-parallel-size", "2",
              "--sequence-parallel"],
    "moe": [*TINY, "--qk-layernorm", "--num-experts", "4", "--moe-router-topk", "2",
            "--moe-ffn-hidden-size", "32", "--pipeline-model-parallel-size", "2"],
}  # fmt: skip
TRAIN = [
    "--transformer-impl", "local", "--distributed-backend", "gloo", "--mock-data",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--train-iters", "4",
    "--tst-bag-size", "4", "--tst-phase1-fraction", "0.5", "--save-interval", "2",
    "--log-interval", "1", "--eval-iters", "1", "--init-method-std", "0.05", "--seed", "3",
]  # fmt: skip
TOL = 1e-4
GREEDY_STEPS = 6


def load_tool(name: str):
    """``tools/{name}.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(script: str, flags: list[str]) -> subprocess.Popen:
    """Start a 2-rank gloo launch (see `finish`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / script), *flags]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )


def finish(proc: subprocess.Popen) -> str:
    """Wait for a launch; returns its output (asserting success)."""
    try:
        output = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, output[-4000:]
    return output


def convert(argv: list[str], capsys) -> tuple[int, str]:
    """tools/convert_checkpoint.py in this process: (exit status, its ``error:`` lines; torch's
    import-time warnings, printed by whichever test imports first, left out)."""
    code = load_tool("convert_checkpoint").main(argv)
    err = capsys.readouterr().err
    return code, "".join(line for line in err.splitlines(True) if line.startswith("error:"))


# --------------------------------------------------------------------------------------------
# Megatron side, in a one-rank CPU process
# --------------------------------------------------------------------------------------------


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, n]`` token ids -> ``[b, n, Vp]`` logits of a TP=PP=1 model."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None)


def megatron_outputs(
    flags: list[str],
    load: str,
    tokens: torch.Tensor,
    prompt: torch.Tensor | None = None,
    windows: torch.Tensor | None = None,
) -> dict:
    """Logits ``[b, n, V]`` on ``tokens``, greedy continuation of ``prompt``, and the mean
    next-token loss on ``windows`` over the padded vocabulary (as the trainer computes it)."""
    from tst_megatron.conversion.megatron_io import find_checkpoint, load_model
    from tst_megatron.training.arguments import parse_args
    from tst_megatron.training.tool_flags import single_process_settings

    run, _ = single_process_settings(parse_args(flags))
    model = load_model(run, find_checkpoint(load)[0]).eval()
    vocab = run.model.vocab_size
    out = {}
    with torch.no_grad():
        out["logits"] = _logits(model, tokens)[..., :vocab]
        if prompt is not None:
            seq, margins = prompt, []
            for _ in range(GREEDY_STEPS):
                last = _logits(model, seq)[:, -1, :vocab]
                top2 = last.topk(2).values
                margins.append((top2[:, 0] - top2[:, 1]).min().item())
                seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
            out["greedy"], out["margin"] = seq, min(margins)
        if windows is not None:
            logits = _logits(model, windows[:, :-1])
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    return out


def export_and_reference(
    runs: dict[str, str], out: str, tokens: torch.Tensor, prompt: torch.Tensor,
    windows: torch.Tensor,
) -> dict:
    """Export each trained run to HF (mcore-to-hf) and compute its Megatron outputs."""
    tool = load_tool("convert_checkpoint")
    results = {}
    for name, save in runs.items():
        hf_dir = os.path.join(out, name)
        shard = ["--max-shard-size", "100KB"] if name == "moe" else []
        assert tool.main(["mcore-to-hf", *MODELS[name], "--load", save, "--hf-dir", hf_dir,
                          *shard]) == 0  # fmt: skip
        results[name] = megatron_outputs(MODELS[name], save, tokens, prompt, windows)
        results[name]["hf_dir"] = hf_dir
    return results


def import_and_export(hf_dirs: dict[str, str], out: str, tokens: torch.Tensor) -> dict:
    """Each HF dir -> Megatron (hf-to-mcore), its Megatron logits, and back (mcore-to-hf)."""
    tool = load_tool("convert_checkpoint")
    results = {}
    for name, hf_dir in hf_dirs.items():
        save, back = os.path.join(out, name), os.path.join(out, f"{name}_back")
        tp = ["--tensor-model-parallel-size", "2"] if name == "qwen3" else []
        assert tool.main(["hf-to-mcore", "--hf-dir", hf_dir, "--save", save, *tp]) == 0
        model_yaml = ["--yaml-config", os.path.join(save, "model.yaml")]
        results[name] = megatron_outputs(model_yaml, save, tokens)
        tokenizer = ["--tokenizer-model", str(SAMPLE)] if name == "llama" else []
        assert tool.main(["mcore-to-hf", *model_yaml, "--load", save, "--hf-dir", back,
                          *tokenizer]) == 0  # fmt: skip
        results[name]["back"] = back
        results[name]["meta"] = json.loads(
            Path(save, "iter_0000000", "tst_checkpoint.json").read_text()
        )
    return results


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB - 1, (8 * SEQ + 1,), generator=g)
    return {
        "tokens": torch.randint(0, VOCAB, (2, 12), generator=g),
        "prompt": torch.randint(0, VOCAB, (2, 5), generator=g),
        # one document of 8 * SEQ + 1 tokens = exactly 8 validation samples of SEQ + 1
        "document": tokens,
        "windows": torch.stack([tokens[i * SEQ : (i + 1) * SEQ + 1] for i in range(8)]),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, inputs) -> dict:
    """Train both models; then evaluate.py on the dense one (a launch) while the dense and the
    MoE model are exported and their Megatron reference outputs computed (one rank)."""
    tmp = tmp_path_factory.mktemp("trained")
    runs = {name: str(tmp / name) for name in MODELS}
    launches = [  # both at once: their start-up (imports) overlaps
        torchrun("pretrain_tst.py", [*flags, *TRAIN, "--save", runs[name]])
        for name, flags in MODELS.items()
    ]
    for launch in launches:
        finish(launch)
    evaluation = torchrun("tools/evaluate.py", evaluate_flags(runs["dense"], inputs, tmp))
    results = run_single(
        export_and_reference,
        args=(runs, str(tmp / "hf"), inputs["tokens"], inputs["prompt"], inputs["windows"]),
        timeout_s=300,
    )
    return {"runs": runs, "results": results, "evaluation": finish(evaluation)}


def evaluate_flags(load: str, inputs: dict, tmp: Path) -> list[str]:
    """evaluate.py of the TP=2 checkpoint at PP=2 on a .bin/.idx dataset of 8 samples."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp / "valid")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(inputs["document"], [len(inputs["document"])])
    builder.finalize(prefix + ".idx")
    flags = [f for f in MODELS["dense"] if f != "--sequence-parallel"]
    flags[flags.index("--tensor-model-parallel-size") + 1] = "1"
    return [
        *flags, *TRAIN[:4], "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
        "--eval-iters", "4", "--load", load, "--valid-data-path", prefix,
        "--data-cache-path", str(tmp / "cache"), "--json",
    ]  # fmt: skip


def _hf_model(name: str):
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=8192 if name == "llama" else 300, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64,
    )  # fmt: skip
    config = {
        "llama": lambda: LlamaConfig(**common, attention_bias=True, mlp_bias=True,
                                     tie_word_embeddings=True, rope_theta=20000.0),
        "qwen3": lambda: Qwen3Config(**common, head_dim=32, rms_norm_eps=1e-5),
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, norm_topk_prob=True),
    }[name]()  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            param.normal_(1.0 if "norm" in pname else 0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, inputs) -> dict:
    """Random HF models saved by transformers (Qwen3 in bf16), converted to Megatron and back.

    Logits are compared in fp32 on both sides (the bf16 weights are exact in fp32).
    """
    tmp = tmp_path_factory.mktemp("imported")
    torch.manual_seed(0)
    hf_dirs, logits = {}, {}
    tokens = inputs["tokens"] % 300
    for name in ("llama", "qwen3", "qwen3_moe"):
        model = _hf_model(name)
        if name == "qwen3":
            model = model.to(torch.bfloat16)
        hf_dirs[name] = str(tmp / f"{name}_hf")
        model.save_pretrained(hf_dirs[name])
        with torch.no_grad():
            logits[name] = _load_hf(hf_dirs[name], torch.float32)(tokens).logits
    results = run_single(
        import_and_export, args=(hf_dirs, str(tmp / "mcore"), tokens), timeout_s=300
    )
    return {"hf_dirs": hf_dirs, "hf_logits": logits, "results": results}


# --------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------


def _load_hf(hf_dir: str, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=dtype, output_loading_info=True
    )
    assert not any(info.values()), info  # every weight used, none missing or reshaped
    model.generation_config.eos_token_id = None  # generate exactly GREEDY_STEPS tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "architecture"), [("dense", "LlamaForCausalLM"),
                                                    ("moe", "Qwen3MoeForCausalLM")])
def test_exported_model_matches_megatron(trained, inputs, name, architecture):
    ref = trained["results"][name]
    model = _load_hf(ref["hf_dir"])
    assert type(model).__name__ == architecture
    assert model.config.vocab_size == VOCAB  # 512 padded rows trimmed
    with torch.no_grad():
        logits = model(inputs["tokens"]).logits
        greedy = model.generate(inputs["prompt"], max_new_tokens=GREEDY_STEPS, do_sample=False)
    diff = (logits - ref["logits"]).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e}, smallest greedy top-2 margin {ref['margin']:.2e}")
    assert diff < TOL
    assert ref["margin"] > 10 * TOL  # the greedy comparison is not decided by rounding
    assert torch.equal(greedy, ref["greedy"])


@pytest.mark.slow
def test_export_layout_files(trained):
    dense, moe = (Path(trained["results"][n]["hf_dir"]) for n in ("dense", "moe"))
    assert sorted(p.name for p in dense.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"
    ]
    index = json.loads((moe / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((moe / s).is_file() for s in shards)
    config = json.loads((dense / "config.json").read_text())
    assert config["rope_theta"] == 5000.0 and config["rms_norm_eps"] == 1e-6
    assert config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    assert json.loads((moe / "config.json").read_text())["tie_word_embeddings"]


@pytest.mark.slow
def test_evaluate_at_another_layout(trained):
    """The TP=2 checkpoint evaluated at PP=2 gives the single-process Megatron loss."""
    output = trained["evaluation"]
    assert "validation loss at iteration 4 | lm loss value: " in output
    assert "lm loss PPL: " in output and "layout changed: resharded" in output
    record = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert record["samples"] == 8 and record["tokens"] == 8 * SEQ
    assert record["lm_loss"] == pytest.approx(trained["results"]["dense"]["loss"], abs=1e-5)


# --------------------------------------------------------------------------------------------
# HF -> Megatron -> HF
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe"])
def test_hf_to_megatron_keeps_logits_and_round_trips(imported, name):
    from tst_megatron.conversion.safetensors_io import load_weights

    ref = imported["results"][name]
    diff = (ref["logits"] - imported["hf_logits"][name]).abs().max().item()
    print(f"{name}: HF -> Megatron max |logit diff| {diff:.2e}")
    assert diff < TOL
    assert ref["meta"]["tst"]["phase"] == 2
    original, back = load_weights(imported["hf_dirs"][name]), load_weights(ref["back"])
    assert sorted(original) == sorted(back)
    dtype = torch.bfloat16 if name == "qwen3" else torch.float32
    assert {t.dtype for t in back.values()} == {dtype}
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    before = json.loads(Path(imported["hf_dirs"][name], "config.json").read_text())
    after = json.loads(Path(ref["back"], "config.json").read_text())
    for key in ("architectures", "vocab_size", "head_dim", "num_key_value_heads",
                "tie_word_embeddings", "rms_norm_eps", "attention_bias", "norm_topk_prob"):
        assert key not in before or after[key] == before[key], key  # fmt: skip


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_phase1_checkpoint_needs_allow_phase1(trained, capsys, tmp_path):
    phase1 = os.path.join(trained["runs"]["dense"], "iter_0000002")
    argv = ["mcore-to-hf", *MODELS["dense"], "--load", phase1]
    code, err = convert([*argv, "--hf-dir", str(tmp_path / "a")], capsys)
    assert code == 1
    assert "error: " in err and "TST phase-1 checkpoint" in err and "--allow-phase1" in err
    assert "valid model, but never trained for plain next-token prediction" in err
    assert not (tmp_path / "a").exists()
    code, _ = convert([*argv, "--hf-dir", str(tmp_path / "b"), "--allow-phase1"], capsys)
    assert code == 0 and (tmp_path / "b" / "model.safetensors").is_file()


@pytest.mark.slow
def test_corrupted_checkpoint_is_refused(trained, capsys, tmp_path):
    copy = tmp_path / "iter_0000004"
    shutil.copytree(Path(trained["runs"]["dense"], "iter_0000004"), copy)
    shard = sorted(copy.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, err = convert(["mcore-to-hf", *MODELS["dense"], "--load", str(copy),
                         "--hf-dir", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 1 and "corrupted" in err and shard.name in err


def _fake_checkpoint(root: Path, flags: list[str], iteration: int = 5) -> Path:
    """A published-looking checkpoint whose metadata describes ``flags`` (no weights)."""
    from tst_megatron.training.arguments import parse_args
    from tst_megatron.training.checkpointing import model_shape
    from tst_megatron.training.tool_flags import single_process_settings

    run, _ = single_process_settings(parse_args(flags))
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    meta = {"iteration": iteration, "tst": {"phase": 2, "bag_size": 4, "mode": "full"},
            "model": model_shape(run.model), "layout": {}}  # fmt: skip
    (path / "tst_checkpoint.json").write_text(json.dumps(meta))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--normalization", "LayerNorm"], "--normalization LayerNorm"),
        (["--position-embedding-type", "learned_absolute"], "learned_absolute"),
    ],
)
def test_unsupported_config_is_refused(tmp_path, capsys, extra, message):
    flags = [*TINY, *extra]
    root = _fake_checkpoint(tmp_path / "ckpt", flags)
    code, err = convert(["mcore-to-hf", *flags, "--load", str(root),
                         "--hf-dir", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 1
    assert err.startswith("error: LlamaForCausalLM cannot express this model") and message in err


def test_moe_without_qk_norm_and_shared_experts_are_refused(tmp_path, capsys):
    flags = [*TINY, "--num-experts", "4", "--moe-shared-expert-intermediate-size", "64"]
    root = _fake_checkpoint(tmp_path / "ckpt", flags)
    code, err = convert(["mcore-to-hf", *flags, "--load", str(root),
                         "--hf-dir", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 1 and "Qwen3MoeForCausalLM cannot express" in err
    assert "shared experts" in err and "--qk-layernorm" in err


def test_flags_must_match_the_checkpoint(tmp_path, capsys):
    root = _fake_checkpoint(tmp_path / "ckpt", TINY)
    code, err = convert(["mcore-to-hf", *TINY, "--hidden-size", "128", "--load", str(root),
                         "--hf-dir", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 1 and "hidden_size: checkpoint 64, flags 128" in err


def test_missing_and_partial_checkpoints_are_refused(tmp_path, capsys):
    def refusal(load: Path) -> str:
        code, err = convert(["mcore-to-hf", *TINY, "--load", str(load),
                             "--hf-dir", str(tmp_path / "out")], capsys)  # fmt: skip
        assert code == 1 and err.startswith("error: "), err
        return err

    assert "no such directory" in refusal(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint there" in refusal(empty)
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "latest_checkpointed_iteration.txt").write_text("7")
    assert "iter_0000007" in refusal(dangling)
    unpublished = tmp_path / "unpublished" / "iter_0000003"
    unpublished.mkdir(parents=True)
    (unpublished / "common.pt").write_bytes(b"")
    assert "partial" in refusal(unpublished)
    no_weights = _fake_checkpoint(tmp_path / "no_weights", TINY)
    assert "cannot load" in refusal(no_weights)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tokenizer_files_come_along(imported):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    back = imported["results"]["llama"]["back"]
    tokenizer = AutoTokenizer.from_pretrained(back)
    text = "The interpreter reads a line."
    expected = Tokenizer.from_file(str(SAMPLE / "tokenizer.json")).encode(text).ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.eos_token == "<|endoftext|>"
    config = json.loads(Path(back, "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["vocab_size"] == 8192


def test_unsupported_hf_models_are_refused(tmp_path, capsys):
    config = {
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 96, "num_attention_heads": 4, "vocab_size": 300,
        "max_position_embeddings": 64, "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["hf-to-mcore", "--hf-dir", str(tmp_path), "--save", str(tmp_path / "out")]
    code, err = convert(argv, capsys)
    assert code == 1 and "RoPE scaling 'llama3'" in err
    config |= {"model_type": "mistral", "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, err = convert(argv, capsys)
    assert code == 1 and "model_type 'mistral'" in err
    config |= {"model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, err = convert(argv, capsys)
    assert code == 1 and "neither model.safetensors nor" in err
