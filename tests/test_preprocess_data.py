"""Tests of tools/preprocess_data.py and of the shipped sample corpus and tokenizer.

Most runs call the tool's ``main`` in this process: starting a fresh interpreter costs
~5 s of ``megatron.core`` import per run. The command-line behaviour (exit codes, checks
that fail before any work, a real multi-process run) is covered through subprocesses.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.tokenizer_files import gpt2_files, sentencepiece_model
from tests.tool_import import import_tool

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
SAMPLE = REPO / "data" / "sample"
TOKENIZER = SAMPLE / "tokenizer.json"


preprocess_data = import_tool("preprocess_data")

HF = ("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(TOKENIZER))
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text: naïve café, 東京, emoji 🙂.\nA second line.",
    "  Leading and trailing spaces are kept.  ",
    "x",
]
BAD_LINES = [
    ('{"text": "unterminated', "malformed JSON: Unterminated string starting at"),
    ('["a", "list"]', "malformed JSON: expected an object, got list"),
    ('{"body": "no text key"}', "missing key 'text'"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8: 'utf-8' codec can't decode byte 0xe9"),
    ('{"text": ""}', "empty text for key 'text'"),
    ('{"text": "   "}', "empty text for key 'text'"),
    ('{"text": 42}', "value of key 'text' is int, not a string"),
    ("", "blank line"),
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER))


def write_jsonl(path: Path, lines: list[str | bytes | dict]) -> Path:
    """Write records (dicts) or raw lines (str/bytes, newline added) to ``path``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as out:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            out.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


def read_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def preprocess(
    capsys: pytest.CaptureFixture, source: Path, prefix: Path, *args: str, tokenizer=HF
) -> tuple[int, str, str]:
    """Run the tool's ``main`` in this process; return (exit code, stdout, stderr)."""
    argv = ["--input", str(source), "--output-prefix", str(prefix), *tokenizer, *args]
    code = preprocess_data.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the tool as a script, the way users do."""
    command = [sys.executable, str(TOOLS / "preprocess_data.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def read_documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))]


def dataset_bytes(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_round_trip_gives_tokenizer_ids_with_eod(tmp_path, capsys, hf_tokenizer):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "b.jsonl.gz", [{"text": text} for text in DOCS[2:]])
    write_jsonl(inputs / "a.jsonl", [{"text": text, "id": i} for i, text in enumerate(DOCS[:2])])
    (inputs / "notes.txt").write_text("not an input\n")

    code, out, err = preprocess(
        capsys, inputs, tmp_path / "out", "--append-eod", "--log-interval", "2"
    )

    assert code == 0, err
    expected = [[*hf_tokenizer.encode(text).ids, 0] for text in DOCS]
    assert read_documents(tmp_path / "out_text_document") == expected
    assert f"wrote 4 documents, {sum(map(len, expected))} tokens (uint16)" in out
    assert "processed 2 documents (" in err and " docs/s, " in err and " MB/s)" in err
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["in", "out_text_document.bin", "out_text_document.idx"]


def test_without_append_eod_documents_are_plain_ids(tmp_path, capsys, hf_tokenizer):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in DOCS])
    code, _, err = preprocess(capsys, corpus, tmp_path / "out")
    assert code == 0, err
    expected = [hf_tokenizer.encode(text).ids for text in DOCS]
    assert read_documents(tmp_path / "out_text_document") == expected


def test_output_is_independent_of_workers_and_partitions(tmp_path, capsys):
    outputs = {}
    for workers, partitions in ((1, 1), (2, 1), (2, 2)):
        prefix = tmp_path / f"w{workers}p{partitions}"
        options = f"--append-eod --workers {workers} --partitions {partitions}".split()
        code, _, err = preprocess(capsys, SAMPLE / "valid.jsonl.gz", prefix, *options)
        assert code == 0, err
        outputs[workers, partitions] = dataset_bytes(Path(f"{prefix}_text_document"))
    assert outputs[2, 1] == outputs[1, 1]
    assert outputs[2, 2] == outputs[1, 1]
    assert not [path for path in tmp_path.iterdir() if "tmp" in path.name]


def test_cli_multiprocess_run_matches_in_process_run(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in DOCS * 50])
    code, _, err = preprocess(capsys, corpus, tmp_path / "one", "--append-eod")
    assert code == 0, err

    options = ["--append-eod", "--workers", "4", "--partitions", "2"]
    result = run_cli(
        "--input", str(corpus), "--output-prefix", str(tmp_path / "cli"), *HF, *options
    )

    assert result.returncode == 0, result.stderr
    assert "wrote 200 documents" in result.stdout
    assert "MB/s" in result.stdout and "tokens/s" in result.stdout
    cli, one = tmp_path / "cli_text_document", tmp_path / "one_text_document"
    assert dataset_bytes(cli) == dataset_bytes(one)


def test_zstandard_input_matches_plain_input(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    plain = write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in DOCS])
    compressed = tmp_path / "in.jsonl.zst"
    compressed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for source, prefix in ((plain, "plain"), (compressed, "zst")):
        code, _, err = preprocess(capsys, source, tmp_path / prefix, "--append-eod")
        assert code == 0, err
    zst, plain = tmp_path / "zst_text_document", tmp_path / "plain_text_document"
    assert dataset_bytes(zst) == dataset_bytes(plain)


def test_zstandard_input_without_the_package_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes the import fail
    compressed = tmp_path / "in.jsonl.zst"
    compressed.write_bytes(b"")
    code, _, err = preprocess(capsys, compressed, tmp_path / "out")
    assert code == 1
    assert f"error: reading {compressed} needs the 'zstandard' package" in err


def test_multiple_keys_give_aligned_datasets(tmp_path, capsys, hf_tokenizer):
    records = [
        {"title": "First", "text": "Body one."},
        {"text": "A body without a title."},
        {"title": "Third", "text": "Body three."},
    ]
    corpus = write_jsonl(tmp_path / "in.jsonl", records)
    code, _, err = preprocess(capsys, corpus, tmp_path / "out", "--json-keys", "text", "title")
    assert code == 0, err
    assert f"{corpus}:2: missing key 'title'" in err
    bodies = [hf_tokenizer.encode(text).ids for text in ("Body one.", "Body three.")]
    titles = [hf_tokenizer.encode(text).ids for text in ("First", "Third")]
    assert read_documents(tmp_path / "out_text_document") == bodies
    assert read_documents(tmp_path / "out_title_document") == titles


def test_bad_lines_are_skipped_and_reported_with_line_numbers(tmp_path, capsys, hf_tokenizer):
    lines = [{"text": "first good"}, *(line for line, _ in BAD_LINES), {"text": "last good"}]
    corpus = write_jsonl(tmp_path / "in.jsonl", lines)

    code, out, err = preprocess(capsys, corpus, tmp_path / "out", "--append-eod")

    assert code == 0, err
    for number, (_, message) in enumerate(BAD_LINES, start=2):
        assert f"warning: {corpus}:{number}: {message}" in err
    assert (
        "skipped 8 of 10 lines (blank line: 1, empty text: 2, invalid UTF-8: 1, "
        "malformed JSON: 2, missing key: 1, not a string: 1)"
    ) in out
    expected = [[*hf_tokenizer.encode(text).ids, 0] for text in ("first good", "last good")]
    assert read_documents(tmp_path / "out_text_document") == expected


@pytest.mark.parametrize(("bad_line", "message"), BAD_LINES, ids=lambda value: str(value)[:20])
def test_strict_fails_on_bad_line_and_keeps_existing_dataset(tmp_path, capsys, bad_line, message):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}, bad_line, {"text": "good"}])
    existing = {
        tmp_path / f"out_text_document{suffix}": f"old {suffix}".encode()
        for suffix in (".bin", ".idx")
    }
    for path, content in existing.items():
        path.write_bytes(content)

    code, _, err = preprocess(capsys, corpus, tmp_path / "out", "--strict")

    assert code == 1
    assert f"error: {corpus}:2: {message}" in err
    assert {path: path.read_bytes() for path in tmp_path.iterdir() if path != corpus} == existing


def test_strict_failure_in_a_partition_leaves_no_files(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}] * 9 + ['{"text": 1}'])
    code, _, err = preprocess(
        capsys, corpus, tmp_path / "out", "--strict", "--workers", "2", "--partitions", "2"
    )
    assert code == 1
    assert f"error: {corpus}:10: value of key 'text' is int, not a string" in err
    assert list(tmp_path.iterdir()) == [corpus]


def test_input_with_only_bad_lines_writes_nothing(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "in.jsonl", ['{"text": ""}', "{oops"])
    code, _, err = preprocess(capsys, corpus, tmp_path / "out")
    assert code == 1
    assert "error: no documents to write: all 2 input lines were skipped" in err
    assert list(tmp_path.iterdir()) == [corpus]


def early_failures(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, expected message) of runs that must fail before doing any work."""
    corpus = str(write_jsonl(tmp / "in.jsonl", [{"text": "good"}]))
    (tmp / "empty").mkdir()
    out = ["--output-prefix", str(tmp / "out")]
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", corpus]
    suffixes = ".jsonl/.json/.jsonl.gz/.json.gz/.jsonl.zst/.json.zst"
    return [
        (
            ["--input", f"{tmp}/missing.jsonl", *out, *HF],
            f"error: input not found: {tmp}/missing.jsonl",
        ),
        (
            ["--input", f"{tmp}/*.jsonl.gz", *out, *HF],
            f"error: input glob matches no files: {tmp}/*.jsonl.gz",
        ),
        (
            ["--input", f"{tmp}/empty", *out, *HF],
            f"error: input directory holds no {suffixes} files: {tmp}/empty",
        ),
        (
            ["--input", corpus, "--output-prefix", f"{tmp}/nodir/out", *HF],
            f"error: output directory does not exist: {tmp}/nodir",
        ),
        (
            ["--input", corpus, "--output-prefix", f"{corpus}/out", *HF],
            f"error: output directory is not a directory: {corpus}",
        ),
        (
            ["--input", corpus, *out, *HF[:3], f"{tmp}/empty"],
            f"error: tokenizer not found: {tmp}/empty",
        ),
        (
            ["--input", corpus, *out, *gpt2],
            "error: --tokenizer-type GPT2BPETokenizer needs --merge-file",
        ),
        (
            ["--input", corpus, *out, *gpt2, "--merge-file", f"{tmp}/merges.txt"],
            f"error: tokenizer file not found: {tmp}/merges.txt (--merge-file)",
        ),
    ]


def test_bad_arguments_fail_before_any_work(tmp_path):
    for args, message in early_failures(tmp_path):
        before = sorted(tmp_path.rglob("*"))
        result = run_cli(*args)
        assert result.returncode == 1, args
        assert message in result.stderr, result.stderr
        assert sorted(tmp_path.rglob("*")) == before


def test_unwritable_output_directory_fails_before_any_work(tmp_path, capsys, monkeypatch):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write there anyway, so simulate the refusal

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, _, err = preprocess(capsys, corpus, locked / "out")
    assert code == 1
    assert f"error: output directory is not writable: {locked} (Permission denied)" in err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--workers", "3", "--partitions", "2"],
            "--workers (3) must be a multiple of --partitions (2)",
        ),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--json-keys", "text", "text"], "--json-keys has duplicates: text text"),
    ],
)
def test_invalid_options_are_usage_errors(tmp_path, args, message):
    result = run_cli("--input", "in.jsonl", "--output-prefix", str(tmp_path / "out"), *HF, *args)
    assert result.returncode == 2
    assert f"error: {message}" in result.stderr


def test_gpt2_bpe_files_give_the_same_dataset(tmp_path, capsys):
    gpt2 = gpt2_files(tmp_path)
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in DOCS])
    for prefix, tokenizer in (("hf", HF), ("gpt2", gpt2)):
        code, _, err = preprocess(
            capsys, corpus, tmp_path / prefix, "--append-eod", tokenizer=tokenizer
        )
        assert code == 0, err
    gpt2_dataset, hf_dataset = tmp_path / "gpt2_text_document", tmp_path / "hf_text_document"
    assert dataset_bytes(gpt2_dataset) == dataset_bytes(hf_dataset)


def test_append_eod_needs_an_eod_token(tmp_path, capsys):
    gpt2 = gpt2_files(tmp_path, drop="<|endoftext|>")
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    code, _, err = preprocess(capsys, corpus, tmp_path / "out", "--append-eod", tokenizer=gpt2)
    assert code == 1
    assert f"error: --append-eod: tokenizer {tmp_path}/vocab.json has no end-of-document" in err


def test_more_partitions_than_lines(tmp_path, capsys, hf_tokenizer):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "only line"}])
    code, _, err = preprocess(
        capsys, corpus, tmp_path / "out", "--workers", "2", "--partitions", "2"
    )
    assert code == 0, err  # the first partition is empty
    expected = [hf_tokenizer.encode("only line").ids]
    assert read_documents(tmp_path / "out_text_document") == expected


def test_sentencepiece_round_trip(tmp_path, capsys):
    sentencepiece = pytest.importorskip("sentencepiece")
    model = sentencepiece_model(tmp_path)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": DOCS[0]}])
    spm = ("--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model))

    code, _, err = preprocess(capsys, corpus, tmp_path / "out", "--append-eod", tokenizer=spm)

    assert code == 0, err
    expected = [[*processor.encode(DOCS[0]), processor.eos_id()]]
    assert read_documents(tmp_path / "out_text_document") == expected


def test_sentencepiece_without_the_package_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes the import fail
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    spm = ("--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "spm.model")
    code, _, err = preprocess(capsys, corpus, tmp_path / "out", tokenizer=spm)
    assert code == 1
    assert "error: SentencePieceTokenizer needs the 'sentencepiece' package" in err


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [
        (8192, np.uint16),
        (65500, np.uint16),
        (65536, np.uint16),
        (65537, np.int32),
        (128256, np.int32),
    ],
)
def test_token_dtype_follows_vocab_size(vocab_size, dtype):
    assert preprocess_data.token_dtype(vocab_size) is dtype


def test_shipped_corpus_splits_are_disjoint_and_tokenizer_has_eod(hf_tokenizer):
    splits = {name: read_texts(SAMPLE / f"{name}.jsonl.gz") for name in ("train", "valid")}
    assert len(splits["train"]) > 1000 and len(splits["valid"]) > 50
    assert all(text.strip() for texts in splits.values() for text in texts)
    assert not set(splits["train"]) & set(splits["valid"])
    assert 3e6 < sum(len(text.encode()) for text in splits["train"]) < 6e6
    assert hf_tokenizer.token_to_id("<|endoftext|>") == 0
    assert hf_tokenizer.get_vocab_size() == 8192
    assert (SAMPLE / "README.md").is_file()


def test_gpt_dataset_reads_the_output(tmp_path, capsys):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    code, _, err = preprocess(capsys, SAMPLE / "valid.jsonl.gz", tmp_path / "valid", "--append-eod")
    assert code == 0, err
    prefix = tmp_path / "valid_text_document"
    tokenizer = SimpleNamespace(
        eod=0, vocab_size=8192, unique_identifiers={"class": "sample", "path": str(TOKENIZER)}
    )
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=128,
        blend=([str(prefix)], None),
        split="1,0,0",
        path_to_cache=str(tmp_path / "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        mid_level_dataset_surplus=0.005,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [16, None, None], lambda: True, config)
    train, valid, test = builder.build()

    assert valid is None and test is None and len(train) >= 16
    documents = IndexedDataset(str(prefix))
    stream = np.concatenate([documents[i] for i in train.document_index]).astype(np.int64)
    for i in range(3):
        sample = train[i]
        assert sample["tokens"].shape == (128,)
        assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
        window = np.append(sample["tokens"].numpy(), sample["labels"][-1].item())
        assert window.astype(np.int64).tobytes() in stream.tobytes()


# The shipped validation split, tokenized with the shipped tokenizer and --append-eod, as the
# tool wrote it before its tokenizer loading moved into tst_megatron.data.tokenizer.
SAMPLE_VALID_SHA256 = {
    "bin": "ee0c6ba55de697e51c037e207c805145f2d67f24d1b96e00ab0ed62c08f4d082",
    "idx": "d9b127a68f003e01780cd5cd2b7041027d72f1253f224b61e6f6908616397128",
}


def test_shipped_corpus_output_is_unchanged(tmp_path, capsys):
    import hashlib

    code, _, err = preprocess(capsys, SAMPLE / "valid.jsonl.gz", tmp_path / "valid", "--append-eod")
    assert code == 0, err
    prefix = tmp_path / "valid_text_document"
    digests = {
        suffix: hashlib.sha256(Path(f"{prefix}.{suffix}").read_bytes()).hexdigest()
        for suffix in ("bin", "idx")
    }
    assert digests == SAMPLE_VALID_SHA256
