"""Convert ``pretrain_tst.py`` checkpoints to Hugging Face model directories and back.

Megatron -> Hugging Face (one CPU process, any saved TP/PP/EP layout)::

    python tools/convert_checkpoint.py mcore-to-hf --load CKPT --hf-dir OUT \
        [--tokenizer-model TOK] [--vocab-size V] [--max-shard-size 5GB] \
        [--dtype auto|float32|bfloat16|float16] [--allow-phase1]

``--load`` is the run's save directory (the tracker picks the iteration) or one ``iter_``
directory. The model and tokenizer settings come from the checkpoint's record
(``tst_checkpoint.json``), as with Megatron-LM's ``--use-checkpoint-args``; model flags or a
``--yaml-config`` given anyway are checked against it, and a checkpoint written before the
record needs them. The padded vocabulary is trimmed to ``--vocab-size`` or else the
tokenizer's size. Dense models become ``LlamaForCausalLM`` (``Qwen3ForCausalLM``
with ``--qk-layernorm``), MoE models ``Qwen3MoeForCausalLM``. OUT gets ``config.json``,
``generation_config.json``, ``model.safetensors`` (or shards + index) and the tokenizer files.

Hugging Face -> Megatron::

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir DIR --save CKPT \
        [--tensor-model-parallel-size N] [--make-vocab-size-divisible-by 128] [--dtype auto]

writes ``CKPT/iter_0000000`` (TST phase 2) + tracker, and ``CKPT/model.yaml`` with the model
flags. Continue with ``pretrain_tst.py --yaml-config ... --load CKPT --finetune`` at any layout;
the vocabulary is padded for the tensor-parallel size given here (the padding depends on it).

Exit status: 0 on success, 1 when the checkpoint or model cannot be converted (``error: ...``
on stderr says why), 2 for unusable flags.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from tst_megatron.conversion import ConversionError  # noqa: E402
from tst_megatron.data.tokenizer import TokenizerError  # noqa: E402
from tst_megatron.settings import DataConfig, SettingsError  # noqa: E402
from tst_megatron.training.arguments import ConfigError, build_parser  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")  # fmt: skip
PHASE1_HELP = "a valid model, but never trained for plain next-token prediction"
PHASE1_TRAINING = {  # what phase 1 trained on, per --tst-mode
    "full": "bag-averaged inputs and multi-hot next-bag targets",
    "input-only": "bag-averaged inputs",
    "output-only": "multi-hot targets (the next s tokens at once)",
}


# --------------------------------------------------------------------------------------------
# Megatron -> Hugging Face
# --------------------------------------------------------------------------------------------


def mcore_to_hf_parser() -> argparse.ArgumentParser:
    """``pretrain_tst.py``'s parser (for the run's flags) plus the conversion flags."""
    parser = build_parser()
    parser.prog = "convert_checkpoint.py mcore-to-hf"
    group = parser.add_argument_group("conversion")
    group.add_argument("--hf-dir", required=True, help="Output directory (new or empty).")
    group.add_argument(
        "--max-shard-size",
        default="5GB",
        help="Split model.safetensors into shards of at most this size (with an index).",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="Weight dtype in the output; auto = the dtype the checkpoint stores.",
    )
    group.add_argument(
        "--allow-phase1",
        action="store_true",
        help=f"Export a TST phase-1 checkpoint ({PHASE1_HELP}).",
    )
    return parser


def mcore_to_hf(argv: list[str]) -> str:
    """Run the mcore-to-hf direction; returns the output directory."""
    from tst_megatron.conversion.hf_config import hf_config
    from tst_megatron.conversion.megatron_io import (
        check_model_shape,
        find_checkpoint,
        load_model,
        stored_dtype,
    )
    from tst_megatron.conversion.safetensors_io import parse_size, save_weights
    from tst_megatron.conversion.spec import architecture, convertible_model
    from tst_megatron.conversion.weights import mcore_to_hf as convert
    from tst_megatron.training.checkpoint_files import CheckpointError
    from tst_megatron.training.model_builder import single_process_parallel_state
    from tst_megatron.training.tool_flags import (
        apply_recorded_settings,
        parse_run_args,
        single_process_settings,
    )

    run_args = parse_run_args(mcore_to_hf_parser(), argv)
    if run_args.load is None:
        raise ConfigError("mcore-to-hf needs --load (the checkpoint to convert)")
    out = run_args.hf_dir
    if os.path.isdir(out) and os.listdir(out):
        raise ConversionError(f"--hf-dir {out} is not empty; give a new or empty directory")
    max_shard = parse_size(run_args.max_shard_size)
    path, meta = find_checkpoint(run_args.load)
    try:  # the record's model and tokenizer settings, for the flags not given
        apply_recorded_settings(run_args, run_args.given_settings, meta, path)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    tst = meta["tst"]
    if tst["phase"] == 1 and not run_args.allow_phase1:
        raise ConversionError(
            f"{path} is a TST phase-1 checkpoint (iteration {meta['iteration']}, bag size "
            f"{tst['bag_size']}, mode {tst['mode']}): {PHASE1_HELP} - phase 1 trains on "
            f"{PHASE1_TRAINING.get(tst['mode'], 'superposed tokens')} only, so as a language "
            "model it predicts poorly. Convert a checkpoint from after the phase boundary, or "
            "pass --allow-phase1 to export it anyway"
        )
    if run_args.tokenizer_model and run_args.tokenizer_type is None:
        run_args.tokenizer_type = "HuggingFaceTokenizer"
    settings, tokenizer = single_process_settings(run_args)
    settings = settings.with_padded_vocab_size(meta["model"]["padded_vocab_size"])
    check_model_shape(settings.model, meta, path)
    model = convertible_model(settings.model, settings.model.vocab_size or tokenizer.vocab_size)
    dtype = stored_dtype(path) if run_args.dtype == "auto" else DTYPES[run_args.dtype]
    with single_process_parallel_state():
        state = load_model(settings, path).state_dict()
    tensors = convert(state, model)
    dtype_name = str(dtype).removeprefix("torch.")
    eos = None if settings.data.tokenizer_type == "NullTokenizer" else tokenizer.eod
    with _output_dir(out):
        files = save_weights(tensors, out, dtype, max_shard)
        _write_json(os.path.join(out, "config.json"), hf_config(model, dtype_name, None, eos))
        _write_json(
            os.path.join(out, "generation_config.json"),
            {"_from_model_config": True, "bos_token_id": None, "eos_token_id": eos},
        )
        copied = _copy_tokenizer(settings.data, tokenizer, out, model.max_position_embeddings)
    print(
        f"converted {path} (iteration {meta['iteration']}, TST phase {tst['phase']}, saved at "
        f"{meta['layout']}) to {architecture(model)} in {out}: {len(tensors)} tensors, "
        f"{dtype_name}, vocabulary {model.vocab_size} (padded {model.padded_vocab_size}), "
        f"{', '.join(files)}"
        + (f"; tokenizer: {', '.join(copied)}" if copied else "; no tokenizer files")
    )
    return out


@contextlib.contextmanager
def _output_dir(out: str):
    """Create ``out`` (new or empty); a failed write (full or read-only disk) removes what
    was written and is a `ConversionError` naming the directory and the cause."""
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        yield
    except OSError as err:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for name in os.listdir(out) if os.path.isdir(out) else []:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(out, name))
        reason = err.strerror or str(err)
        symbol = errno.errorcode.get(err.errno) if err.errno is not None else None
        code = f" [{symbol}]" if symbol is not None else ""
        raise ConversionError(
            f"cannot write --hf-dir {out}: {reason}{code}"
            + (f" ({err.filename})" if err.filename else "")
            + "; nothing was left there. Free space or give a writable --hf-dir"
        ) from None


def _copy_tokenizer(data: DataConfig, tokenizer, out: str, max_length: int) -> list[str]:
    """Copy the run's tokenizer files into ``out``; add a ``tokenizer_config.json`` if none."""
    extra: dict = {}
    files: list[tuple[str | None, str]]
    if data.tokenizer_type == "HuggingFaceTokenizer":
        model = str(data.tokenizer_model)
        files = [(os.path.join(model, name), name) for name in TOKENIZER_FILES]
        if not os.path.isdir(model):
            files = [(tokenizer.path, "tokenizer.json")]
        tokenizer_class = "PreTrainedTokenizerFast"
    elif data.tokenizer_type == "GPT2BPETokenizer":
        files = [(data.vocab_file, "vocab.json"), (data.merge_file, "merges.txt")]
        tokenizer_class = "GPT2TokenizerFast"
    elif data.tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        files = [(data.tokenizer_model, "tokenizer.model")]
        tokenizer_class = "LlamaTokenizer"  # the plain SentencePiece model, as trained
        extra = {"add_bos_token": False, "add_eos_token": False, "legacy": True}
    else:  # NullTokenizer: token ids are the text, there is nothing to copy
        return []
    copied = []
    for source, name in files:
        if source is not None and os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out, name))
            copied.append(name)
    if "tokenizer_config.json" not in copied:
        _write_json(
            os.path.join(out, "tokenizer_config.json"),
            {
                "tokenizer_class": tokenizer_class,
                "eos_token": tokenizer.eod_token,
                "model_max_length": max_length,
                **extra,
            },
        )
        copied.append("tokenizer_config.json (written)")
    return copied


# --------------------------------------------------------------------------------------------
# Hugging Face -> Megatron
# --------------------------------------------------------------------------------------------


def hf_to_mcore_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py hf-to-mcore",
        description="Hugging Face Llama / Qwen3 / Qwen3-MoE directory -> torch_dist checkpoint.",
        allow_abbrev=False,
    )
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory.")
    parser.add_argument("--save", required=True, help="Checkpoint directory to create.")
    parser.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP size of the run that will load it (the vocabulary padding depends on it).",
    )
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="Parameter dtype of the checkpoint; auto = config.json's dtype (the run's "
        "--bf16/--fp16 should match it).",
    )
    return parser


def hf_to_mcore(argv: list[str]) -> str:
    """Run the hf-to-mcore direction; returns the iteration directory written."""
    from tst_megatron.conversion.hf_config import model_from_hf_config
    from tst_megatron.conversion.megatron_io import save_model_checkpoint
    from tst_megatron.conversion.safetensors_io import load_weights
    from tst_megatron.conversion.spec import architecture, model_settings
    from tst_megatron.conversion.weights import hf_to_mcore as convert
    from tst_megatron.training.checkpointing import TRACKER
    from tst_megatron.training.tool_flags import single_process_settings

    options = hf_to_mcore_parser().parse_args(argv)
    if os.path.exists(os.path.join(options.save, TRACKER)):
        raise ConversionError(f"--save {options.save} already holds a checkpoint")
    config_path = os.path.join(options.hf_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {config_path}: {err}") from None
    model = model_from_hf_config(config)
    dtype = options.dtype
    if dtype == "auto":
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    precision = {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(dtype, [])
    settings = model_settings(model)
    parser = build_parser()
    parser.set_defaults(**settings)  # as --yaml-config SAVE/model.yaml gives them
    run_args = parser.parse_args(
        [
            *precision,
            "--seq-length", str(model.seq_length),
            "--tensor-model-parallel-size", str(options.tensor_model_parallel_size),
            "--make-vocab-size-divisible-by", str(options.make_vocab_size_divisible_by),
        ]
    )  # fmt: skip
    run, _ = single_process_settings(run_args)
    padded_vocab_size = run.model.vocab
    state = convert(load_weights(options.hf_dir), model, padded_vocab_size)
    path = save_model_checkpoint(run, state, options.save)
    assert path is not None  # None only where --save's tracker names iteration 0: refused above
    model_yaml = os.path.join(options.save, "model.yaml")
    with open(model_yaml, "w") as f:
        f.write(f"# model settings of {architecture(model)} {options.hf_dir}\n")
        yaml.safe_dump(settings, f, sort_keys=False)
    print(
        f"converted {options.hf_dir} ({architecture(model)}) to {path} (phase 2, vocabulary "
        f"{model.vocab_size} padded to {padded_vocab_size} for TP "
        f"{options.tensor_model_parallel_size}); continue with: pretrain_tst.py "
        f"--yaml-config {model_yaml} --load {options.save} --finetune ...   (model settings: "
        + ", ".join(f"{key}: {value}" for key, value in settings.items())
        + ")"
    )
    return path


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


DIRECTIONS = {"mcore-to-hf": mcore_to_hf, "hf-to-mcore": hf_to_mcore}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in DIRECTIONS:
        print(
            f"usage: convert_checkpoint.py {{{','.join(DIRECTIONS)}}} ... (--help for each)",
            file=sys.stderr,
        )
        return 2
    warnings.filterwarnings("ignore", module="megatron")
    try:
        DIRECTIONS[argv[0]](argv[1:])
    except (ConfigError, SettingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ConversionError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
