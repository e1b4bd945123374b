"""Tokenizer files for tests: GPT-2 BPE files, a tiny SentencePiece model and a Hugging Face
directory whose post-processor adds a BOS, all made from the shipped sample tokenizer/corpus."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
SAMPLE_TOKENIZER = SAMPLE / "tokenizer.json"


def sample_texts(count: int) -> list[str]:
    """The first ``count`` texts of the shipped validation corpus."""
    with gzip.open(SAMPLE / "valid.jsonl.gz", "rt", encoding="utf-8") as lines:
        return [json.loads(line)["text"] for _, line in zip(range(count), lines, strict=False)]


def gpt2_files(directory: Path, drop: str | None = None) -> tuple[str, ...]:
    """Write the shipped tokenizer as GPT-2 vocab/merges files (without token ``drop``); the
    ``pretrain_tst.py``/``preprocess_data.py`` flags naming them."""
    model = json.loads(SAMPLE_TOKENIZER.read_text(encoding="utf-8"))["model"]
    vocab = {token: id_ for token, id_ in model["vocab"].items() if token != drop}
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"])
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    files = (
        "--vocab-file",
        str(directory / "vocab.json"),
        "--merge-file",
        str(directory / "merges.txt"),
    )
    return ("--tokenizer-type", "GPT2BPETokenizer", *files)


def sentencepiece_model(directory: Path) -> Path:
    """Train a 300-piece BPE SentencePiece model on 10 sample texts; its ``.model`` file."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts(10)),
        model_prefix=str(directory / "spm"),
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
    )
    return directory / "spm.model"


def hf_directory_with_bos(directory: Path) -> Path:
    """A Hugging Face tokenizer directory: the sample tokenizer plus ``<s>``/``</s>``, a
    post-processor that prepends ``<s>``, and a ``tokenizer_config.json`` naming ``</s>`` as
    ``eos_token`` (so EOD is not the first of the usual names, ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(SAMPLE_TOKENIZER))
    tokenizer.add_special_tokens(["<s>", "</s>"])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    directory.mkdir(exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": {"content": "</s>"}, "bos_token": "<s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory
