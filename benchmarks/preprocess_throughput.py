"""Throughput of tools/preprocess_data.py on the shipped sample corpus, by worker count.

Runs the tool as a script ``--repeats`` times per ``--workers`` value and reports the best
figures it prints (input MB/s of uncompressed JSONL and tokens/s, timed without interpreter
start-up and the ``megatron.core`` import), plus the speed-up over the first worker count::

    python benchmarks/preprocess_throughput.py            # 1 and 2 workers
    python benchmarks/preprocess_throughput.py --workers 1 2 4 --repeats 3
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = re.compile(r"throughput: .* = ([\d.]+) MB/s, (\d+) tokens/s")


def run_tool(corpus: Path, tokenizer: Path, workers: int, output_dir: str) -> tuple[float, int]:
    """Preprocess ``corpus`` with ``workers`` processes; return (MB/s, tokens/s)."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            "--input",
            str(corpus),
            "--output-prefix",
            f"{output_dir}/w{workers}",
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(tokenizer),
            "--append-eod",
            "--workers",
            str(workers),
            "--log-interval",
            "1000000",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    match = THROUGHPUT.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"preprocess_data.py failed:\n{result.stderr}")
    return float(match.group(1)), int(match.group(2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=REPO / "data/sample/train.jsonl.gz")
    parser.add_argument("--tokenizer", type=Path, default=REPO / "data/sample/tokenizer.json")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count; best wins")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for workers in args.workers:
            runs = [
                run_tool(args.input, args.tokenizer, workers, output_dir)
                for _ in range(args.repeats)
            ]
            results[workers] = max(runs)
    base_mbs = results[args.workers[0]][0]
    print(f"input: {args.input}")
    for workers, (mbs, tokens) in results.items():
        print(
            f"workers={workers}: {mbs:6.2f} MB/s {tokens:9d} tokens/s  "
            f"x{mbs / base_mbs:.2f} vs workers={args.workers[0]}"
        )


if __name__ == "__main__":
    main()
