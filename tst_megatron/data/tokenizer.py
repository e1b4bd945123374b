"""Tokenizers by Megatron-LM's ``--tokenizer-type`` names: the one place tokenizers are loaded.

``tools/preprocess_data.py`` (the ids written to ``.bin/.idx``), the trainer (vocabulary, EOD,
``GPTDataset``), ``tools/evaluate.py`` (through the trainer) and the checkpoint converter all
build their tokenizer here, so a corpus is tokenized and trained with the same rules:

- ``HuggingFaceTokenizer`` (``--tokenizer-model``: a ``tokenizer.json`` or its directory): the
  ids of ``Tokenizer.encode(text)``, with the special tokens its post-processor adds (a BOS,
  say), as Megatron-LM's tokenizer call does; EOD is the ``eos_token`` of a
  ``tokenizer_config.json`` beside it, else the first of `EOD_TOKENS` in the vocabulary;
- ``GPT2BPETokenizer`` (``--vocab-file``, ``--merge-file``): byte-level BPE without a prefix
  space; EOD ``<|endoftext|>``, as Megatron-LM;
- ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer`` (``--tokenizer-model``: the
  ``.model`` file): ``encode_as_ids``; EOD the model's ``eos`` piece;
- ``NullTokenizer`` (``--vocab-size V``): the text's whitespace-separated integers, each in
  ``[0, V)``; EOD ``V - 1``.

``vocab_size`` is every id the tokenizer can produce (added tokens included; ``--vocab-size V``
for ``NullTokenizer``). The model's vocabulary is `model_vocab_size`: ``--vocab-size`` if given,
else the tokenizer's size, rounded up to a multiple of ``--make-vocab-size-divisible-by x TP``
(Megatron-LM's padding, `pad_vocab_size`).

Differences from Megatron-LM, on purpose: ``SentencePieceTokenizer`` is the plain model, like
``GPTSentencePieceTokenizer`` (Megatron-LM's adds BERT/T5 ``<CLS> <SEP> <EOD> <MASK>`` tokens;
a decoder does not use them); ``NullTokenizer``'s ``--vocab-size`` counts the EOD id
(Megatron-LM appends one more id).

Every tokenizer has ``vocab_size``, ``eod`` (None when the tokenizer has none),
``unique_identifiers`` (Megatron-Core's dataset cache key), ``tokenize`` and ``detokenize``.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from tst_megatron.settings.data import DataConfig

HUGGING_FACE = "HuggingFaceTokenizer"
GPT2_BPE = "GPT2BPETokenizer"
SENTENCE_PIECE = "SentencePieceTokenizer"
GPT_SENTENCE_PIECE = "GPTSentencePieceTokenizer"
NULL = "NullTokenizer"
TOKENIZER_TYPES = (HUGGING_FACE, GPT2_BPE, SENTENCE_PIECE, GPT_SENTENCE_PIECE, NULL)
# End-of-document token names tried in this order (after a tokenizer_config.json's eos_token).
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
GPT2_EOD = "<|endoftext|>"


class TokenizerError(ValueError):
    """The tokenizer flags or files are unusable."""


class Tokenizer(Protocol):
    """What every tokenizer of this module offers."""

    vocab_size: int
    eod: int | None
    eod_token: str | None
    unique_identifiers: OrderedDict

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """How to load a tokenizer (Megatron-LM's flags); picklable, so worker processes can load
    their own."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None

    @classmethod
    def from_settings(cls, data: DataConfig, vocab_size: int | None) -> TokenizerSpec:
        """The spec of a run's data section and ``--vocab-size`` (``vocab_size``)."""
        return cls(
            data.tokenizer_type, data.tokenizer_model, data.vocab_file, data.merge_file, vocab_size
        )

    @property
    def source(self) -> str:
        """The file or number the tokenizer comes from, for messages."""
        if self.tokenizer_type == NULL:
            return f"NullTokenizer(--vocab-size {self.vocab_size})"
        return str(self.vocab_file if self.tokenizer_type == GPT2_BPE else self.tokenizer_model)

    def missing_flags(self) -> list[str]:
        """The flags this tokenizer type needs that are not given."""
        model = ("--tokenizer-model", self.tokenizer_model)
        needed: dict[str, tuple[tuple[str, str | int | None], ...]] = {
            HUGGING_FACE: (model,),
            GPT2_BPE: (("--vocab-file", self.vocab_file), ("--merge-file", self.merge_file)),
            SENTENCE_PIECE: (model,),
            GPT_SENTENCE_PIECE: (model,),
            NULL: (("--vocab-size", self.vocab_size),),
        }
        return [flag for flag, value in needed.get(self.tokenizer_type, ()) if not value]

    def check(self) -> None:
        """Raise `TokenizerError` for an unknown type or a missing flag (no file is read)."""
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise TokenizerError(
                f"--tokenizer-type {self.tokenizer_type!r} is not supported; use one of "
                f"{', '.join(TOKENIZER_TYPES)}"
            )
        missing = self.missing_flags()
        if missing:
            raise TokenizerError(
                f"--tokenizer-type {self.tokenizer_type} needs {' and '.join(missing)}"
            )


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """The tokenizer ``spec`` names.

    Raises:
        TokenizerError: unknown type, missing flag, or unreadable files (the message names it).
    """
    spec.check()  # the flags the type needs are given: the casts below hold
    if spec.tokenizer_type == HUGGING_FACE:
        return HFTokenizer(cast(str, spec.tokenizer_model))
    if spec.tokenizer_type == GPT2_BPE:
        return GPT2BPETokenizer(cast(str, spec.vocab_file), cast(str, spec.merge_file))
    if spec.tokenizer_type in (SENTENCE_PIECE, GPT_SENTENCE_PIECE):
        return SentencePieceTokenizer(cast(str, spec.tokenizer_model))
    return NullTokenizer(cast(int, spec.vocab_size))


def build_training_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """The tokenizer ``spec`` names, which must have an EOD token (training needs one).

    Raises:
        TokenizerError: as `build_tokenizer`, or the tokenizer has no EOD token.
    """
    tokenizer = build_tokenizer(spec)
    require_eod(tokenizer, spec, "training")
    return tokenizer


def require_eod(tokenizer: Tokenizer, spec: TokenizerSpec, purpose: str) -> int:
    """``tokenizer.eod``, or a `TokenizerError` saying ``purpose`` needs one."""
    if tokenizer.eod is None:
        raise TokenizerError(
            f"{purpose}: tokenizer {spec.source} has no end-of-document token (looked for "
            f"{', '.join(getattr(tokenizer, 'eod_candidates', EOD_TOKENS))})"
        )
    return tokenizer.eod


# ---------------------------------------------------------------------------- vocabulary


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding: round up to a multiple of ``--make-vocab-size-divisible-by`` x TP."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def model_vocab_size(
    tokenizer: Tokenizer, vocab_size: int | None, divisible_by: int, tensor_parallel_size: int
) -> int:
    """The model's (padded) vocabulary: ``vocab_size`` (``--vocab-size``), else the
    tokenizer's size, padded by `pad_vocab_size`; it must hold every tokenizer id.

    Raises:
        TokenizerError: the tokenizer has more ids than the model's vocabulary.
    """
    padded = pad_vocab_size(vocab_size or tokenizer.vocab_size, divisible_by, tensor_parallel_size)
    if tokenizer.vocab_size > padded:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's padded "
            f"vocabulary (--vocab-size {vocab_size}) has {padded}"
        )
    return padded


# ---------------------------------------------------------------------------- tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (path to the file or to a directory holding it)."""

    def __init__(self, model: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(model) / "tokenizer.json" if os.path.isdir(model) else Path(model)
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer not found: {model} "
                "(expected a tokenizer.json file or a directory holding one)"
            )
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception
            raise TokenizerError(f"cannot load tokenizer {path}: {exc}") from exc
        self.path = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_candidates = eod_candidates(path.parent)
        self.eod = _first_known(self._tok.token_to_id, self.eod_candidates)
        self.eod_token = None if self.eod is None else self._tok.id_to_token(self.eod)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(path)])]
        )

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def eod_candidates(directory: Path) -> list[str]:
    """EOD token names to try: ``eos_token`` of a ``tokenizer_config.json``, then the usual."""
    config_path = directory / "tokenizer_config.json"
    eos = None
    if config_path.is_file():
        try:
            eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError) as exc:
            raise TokenizerError(f"cannot read {config_path}: {exc}") from exc
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return ([eos] if isinstance(eos, str) else []) + list(EOD_TOKENS)


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2 style ``vocab.json`` + ``merges.txt`` (byte-level BPE); EOD ``<|endoftext|>``."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        for flag, file in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not os.path.isfile(file):
                raise TokenizerError(f"tokenizer file not found: {file} ({flag})")
        try:
            tok = RustTokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as exc:  # the Rust library raises plain Exception
            raise TokenizerError(
                f"cannot load GPT-2 BPE from {vocab_file}, {merge_file}: {exc}"
            ) from exc
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.path = vocab_file
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eod_candidates = [GPT2_EOD]
        self.eod = tok.token_to_id(GPT2_EOD)
        self.eod_token = None if self.eod is None else GPT2_EOD
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(vocab_file)])]
        )


class SentencePieceTokenizer:
    """A SentencePiece model file (Megatron-LM's ``GPTSentencePieceTokenizer``); EOD ``eos``."""

    def __init__(self, model: str) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(
                "SentencePieceTokenizer needs the 'sentencepiece' package: "
                "pip install sentencepiece"
            ) from None
        if not os.path.isfile(model):
            raise TokenizerError(f"tokenizer not found: {model}")
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=model)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load SentencePiece model {model}: {exc}") from exc
        self.path = model
        self.vocab_size = self._processor.vocab_size()
        eos = self._processor.eos_id()
        self.eod_candidates = ["the model's eos piece"]
        self.eod = eos if eos >= 0 else None
        self.eod_token = None if self.eod is None else self._processor.id_to_piece(eos)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(model)])]
        )

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode_as_ids(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._processor.decode_ids(ids)


class NullTokenizer:
    """Token ids are the text (whitespace-separated integers in ``[0, V)``); EOD is ``V - 1``."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or vocab_size < 2:
            raise TokenizerError(
                f"--tokenizer-type NullTokenizer needs --vocab-size >= 2, got {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.eod: int | None = vocab_size - 1
        self.eod_token: str | None = None
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", vocab_size)]
        )

    def tokenize(self, text: str) -> list[int]:
        """The ids written in ``text``.

        Raises:
            TokenizerError: a word is not an integer in ``[0, vocab_size)``.
        """
        try:
            ids = [int(word) for word in text.split()]
        except ValueError as exc:
            raise TokenizerError(f"NullTokenizer: the text is not token ids ({exc})") from None
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise TokenizerError(
                f"NullTokenizer: token id {bad} is outside [0, {self.vocab_size}) "
                f"(--vocab-size {self.vocab_size})"
            )
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def _first_known(token_to_id, names: list[str]) -> int | None:
    for name in names:
        token_id = token_to_id(name)
        if token_id is not None:
            return token_id
    return None
