"""One tokenizer module for preprocessing, training and conversion (`tst_megatron.data.tokenizer`).

The central check: a text gets the same ids in ``tools/preprocess_data.py``'s ``.bin`` as from
the tokenizer ``pretrain_tst.py`` builds from the same flags, for every tokenizer type, and
both equal the ids of the underlying library (the independent reference).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.tokenizer_files import (
    SAMPLE,
    SAMPLE_TOKENIZER,
    gpt2_files,
    hf_directory_with_bos,
    sentencepiece_model,
)
from tests.tool_import import import_tool
from tst_megatron.data.builders import open_indexed_dataset
from tst_megatron.data.tokenizer import (
    TokenizerError,
    TokenizerSpec,
    build_tokenizer,
    build_training_tokenizer,
    model_vocab_size,
)
from tst_megatron.settings import RunConfig
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args
from tst_megatron.training.run_config import settings_from_flags

preprocess_data = import_tool("preprocess_data")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text: naïve café, 東京, emoji 🙂.\nA second line.",
    "  Leading and trailing spaces are kept.  ",
    "x",
]
NULL_TEXTS = ["5 7 1 3", "0 998", "42"]
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
         "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
         "--mock-data"]  # fmt: skip


def library_ids(kind: str, flags: tuple[str, ...], text: str) -> list[int]:
    """The ids of ``text`` from the underlying library, without this project's code."""
    value = dict(zip(flags[::2], flags[1::2], strict=True))
    if kind in ("hf", "hf-bos"):
        return Tokenizer.from_file(str(Path(value["--tokenizer-model"]) / "tokenizer.json")).encode(
            text
        ).ids
    if kind == "gpt2":
        return Tokenizer.from_file(str(SAMPLE_TOKENIZER)).encode(text).ids  # same vocab/merges
    if kind in ("sentencepiece", "gpt-sentencepiece"):
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=value["--tokenizer-model"])
        return processor.encode(text)
    return [int(word) for word in text.split()]


@pytest.fixture(scope="module")
def tokenizer_flags(tmp_path_factory) -> dict[str, tuple[str, ...]]:
    """``--tokenizer-*`` flags of every type, with the files they name."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    flags = {
        "hf": ("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(SAMPLE)),
        "hf-bos": ("--tokenizer-type", "HuggingFaceTokenizer",
                   "--tokenizer-model", str(hf_directory_with_bos(tmp / "hf-bos"))),
        "gpt2": gpt2_files(tmp),
        "null": ("--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"),
    }  # fmt: skip
    try:
        import sentencepiece  # noqa: F401 - the optional 'data' extra
    except ImportError:
        return flags
    model = str(sentencepiece_model(tmp))
    flags["sentencepiece"] = ("--tokenizer-type", "SentencePieceTokenizer",
                              "--tokenizer-model", model)  # fmt: skip
    flags["gpt-sentencepiece"] = ("--tokenizer-type", "GPTSentencePieceTokenizer",
                                  "--tokenizer-model", model)  # fmt: skip
    return flags


def trainer_settings(flags: tuple[str, ...], world_size: int = 1) -> RunConfig:
    return settings_from_flags([*MODEL, *flags], world_size)


def trainer_tokenizer(settings: RunConfig):
    """The tokenizer `Trainer.__init__` builds."""
    spec = TokenizerSpec.from_settings(settings.data, settings.model.vocab_size)
    return build_training_tokenizer(spec)


def padded_vocab(settings: RunConfig) -> int:
    """The model's vocabulary `Trainer.__init__` gives `RunConfig.with_padded_vocab_size`."""
    model, tp = settings.model, settings.parallel.tensor_model_parallel_size
    tokenizer = trainer_tokenizer(settings)
    return model_vocab_size(tokenizer, model.vocab_size, model.make_vocab_size_divisible_by, tp)


KINDS = ["hf", "hf-bos", "gpt2", "sentencepiece", "gpt-sentencepiece", "null"]
EXPECTED_EOD = {  # the EOD rule of each type, by token name
    "hf": "<|endoftext|>",
    "hf-bos": "</s>",  # the tokenizer_config.json's eos_token wins over <|endoftext|>
    "gpt2": "<|endoftext|>",
    "sentencepiece": "</s>",
    "gpt-sentencepiece": "</s>",
    "null": None,
}


@pytest.mark.parametrize("kind", KINDS)
def test_preprocessing_and_training_give_the_same_ids(kind, tokenizer_flags, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if kind not in tokenizer_flags:
        pytest.skip("needs the sentencepiece package")
    flags = tokenizer_flags[kind]
    texts = NULL_TEXTS if kind == "null" else TEXTS
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    prefix = tmp_path / "out"
    argv = ["--input", str(corpus), "--output-prefix", str(prefix), *flags, "--append-eod"]
    assert preprocess_data.main(argv) == 0, capsys.readouterr().err

    settings = trainer_settings(flags)
    tokenizer = trainer_tokenizer(settings)
    dataset = IndexedDataset(str(prefix) + "_text_document")
    written = [dataset[i].tolist() for i in range(len(dataset))]
    through_trainer = [[*tokenizer.tokenize(text), tokenizer.eod] for text in texts]
    reference = [[*library_ids(kind, flags, text), tokenizer.eod] for text in texts]
    assert written == through_trainer == reference
    if kind == "hf-bos":
        assert all(ids[0] == Tokenizer.from_file(flags[3] + "/tokenizer.json").token_to_id("<s>")
                   for ids in written)  # fmt: skip
    assert tokenizer.eod_token == EXPECTED_EOD[kind]
    assert tokenizer.eod == (999 if kind == "null" else written[0][-1])
    assert dataset.index.dtype == preprocess_data.token_dtype(tokenizer.vocab_size) == np.uint16
    open_indexed_dataset(str(prefix) + "_text_document", padded_vocab(settings))  # ids fit


def test_vocabulary_and_padding_rules(tokenizer_flags):
    """Padded to a multiple of 128 x TP; --vocab-size fixes it; a larger tokenizer is refused."""
    settings = trainer_settings(tokenizer_flags["hf-bos"])
    tokenizer = trainer_tokenizer(settings)
    assert tokenizer.vocab_size == 8194  # 8192 + <s> + </s>
    assert padded_vocab(settings) == 8320  # 65 x 128
    tp2 = trainer_settings((*tokenizer_flags["hf-bos"], "--tensor-model-parallel-size", "2"), 2)
    assert padded_vocab(tp2) == 8448  # 33 x (128 x 2)
    settings = trainer_settings((*tokenizer_flags["hf"], "--tensor-model-parallel-size", "1",
                                 "--make-vocab-size-divisible-by", "100"))  # fmt: skip
    assert padded_vocab(settings) == 8200
    settings = trainer_settings((*tokenizer_flags["hf"], "--vocab-size", "9000"))
    assert padded_vocab(settings) == 9088
    settings = trainer_settings((*tokenizer_flags["hf"], "--vocab-size", "100"))
    with pytest.raises(TokenizerError, match=r"has 8192 tokens but .*--vocab-size 100\) has 128"):
        padded_vocab(settings)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tokenizer-type", "SentencePieceTokenizer"),
         "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model"),
        (("--tokenizer-type", "GPTSentencePieceTokenizer"),
         "--tokenizer-type GPTSentencePieceTokenizer needs --tokenizer-model"),
        (("--tokenizer-type", "GPT2BPETokenizer"),
         "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file"),
        (("--tokenizer-type", "HuggingFaceTokenizer"),
         "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model"),
    ],
)  # fmt: skip
def test_missing_tokenizer_flags_are_named(flags, message):
    args = parse_args([*MODEL, *flags])
    with pytest.raises(ConfigError, match=message):
        validate_args(args, world_size=1)


def test_bad_tokenizer_inputs_are_named(tmp_path, capsys):
    with pytest.raises(TokenizerError, match=r"--tokenizer-type 'Llama2Tokenizer' is not supp"):
        build_tokenizer(TokenizerSpec("Llama2Tokenizer", "x"))
    with pytest.raises(TokenizerError, match=f"tokenizer not found: {tmp_path}/none.model"):
        build_tokenizer(TokenizerSpec("SentencePieceTokenizer", str(tmp_path / "none.model")))
    null = build_tokenizer(TokenizerSpec("NullTokenizer", vocab_size=10))
    with pytest.raises(TokenizerError, match=r"token id 10 is outside \[0, 10\)"):
        null.tokenize("3 10")
    # preprocessing skips (and names) a NullTokenizer line that is not token ids
    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"text": "1 2"}\n{"text": "one two"}\n{"text": "3 12"}\n')
    null_flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "out"), *null_flags]
    assert preprocess_data.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"{corpus}:2: NullTokenizer: the text is not token ids" in err
    assert f"{corpus}:3: NullTokenizer: token id 12 is outside [0, 10)" in err
    assert "skipped 2 of 3 lines (not token ids: 2)" in out
    with pytest.raises(SystemExit):
        preprocess_data.parse_args(["--input", "x", "--output-prefix", "y", "--vocab-size", "5",
                                    "--tokenizer-type", "HuggingFaceTokenizer"])  # fmt: skip
    assert "--vocab-size is for --tokenizer-type NullTokenizer" in capsys.readouterr().err


def test_a_tokenizer_without_eod_cannot_train(tmp_path):
    flags = gpt2_files(tmp_path, drop="<|endoftext|>")
    with pytest.raises(TokenizerError, match=r"training: tokenizer .*vocab.json has no end-of-doc"):
        trainer_tokenizer(trainer_settings(flags))
