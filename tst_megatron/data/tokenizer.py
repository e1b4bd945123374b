"""Tokenizers by Megatron-LM's ``--tokenizer-type`` names, built on the `tokenizers` library.

Each exposes what Megatron-Core's datasets need (``vocab_size``, ``eod``,
``unique_identifiers``) plus ``tokenize``/``detokenize``.
"""

from __future__ import annotations

import os
from collections import OrderedDict

EOD_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class TokenizerError(ValueError):
    """The tokenizer flags or files are unusable."""


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (path to the file or to a directory holding it)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(
                f"--tokenizer-model {path!r}: no tokenizer.json there (give the file or the "
                "directory holding it)"
            )
        self._tok = Tokenizer.from_file(file)
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = _find_eod(self._tok.token_to_id, file)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(file)])]
        )

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2 style ``vocab.json`` + ``merges.txt`` (byte-level BPE)."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for flag, file in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not file or not os.path.isfile(file):
                raise TokenizerError(f"{flag} {file!r} does not exist")
        tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.path = vocab_file
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eod = _find_eod(tok.token_to_id, vocab_file)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(vocab_file)])]
        )


class NullTokenizer:
    """Token ids are the text (space separated integers); EOD is the last id."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or vocab_size < 2:
            raise TokenizerError(
                f"--tokenizer-type NullTokenizer needs --vocab-size >= 2, got {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", vocab_size)]
        )

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
):
    """The tokenizer named by Megatron-LM's ``--tokenizer-type``."""
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise TokenizerError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model")
        return HFTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; use HuggingFaceTokenizer, "
        "GPT2BPETokenizer or NullTokenizer"
    )


def _find_eod(token_to_id, source: str) -> int:
    for token in EOD_TOKENS:
        token_id = token_to_id(token)
        if token_id is not None:
            return token_id
    raise TokenizerError(f"tokenizer {source} has none of the end-of-document tokens {EOD_TOKENS}")
