"""Train the shipped byte-level BPE tokenizer on the sample corpus's train split.

The result is deterministic: the same corpus always gives the same ``tokenizer.json``.
``<|endoftext|>`` is special token id 0 and serves as the end-of-document (EOD) token.

Usage::

    python data/scripts/train_tokenizer.py --corpus data/sample/train.jsonl.gz \
        --output data/sample/tokenizer.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOD_TOKEN = "<|endoftext|>"


def corpus_texts(path: Path) -> Iterator[str]:
    """Yield the ``text`` field of every line of a ``.jsonl.gz`` corpus."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer with ``EOD_TOKEN`` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts(corpus), trainer=trainer)
    return tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/sample/train.jsonl.gz"))
    parser.add_argument("--output", type=Path, default=Path("data/sample/tokenizer.json"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # One thread, so that the result cannot depend on thread scheduling (read at first use).
    os.environ["RAYON_NUM_THREADS"] = "1"
    if not args.corpus.is_file():
        print(f"error: corpus not found: {args.corpus}", file=sys.stderr)
        return 1
    tokenizer = train(args.corpus, args.vocab_size)
    if tokenizer.token_to_id(EOD_TOKEN) != 0:
        print(f"error: {EOD_TOKEN} did not get id 0", file=sys.stderr)
        return 1
    tokenizer.save(str(args.output), pretty=False)
    print(f"saved {args.output}: vocab {tokenizer.get_vocab_size()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
