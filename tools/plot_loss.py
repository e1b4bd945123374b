"""Plot training/validation loss curves from ``pretrain_tst.py --metrics-jsonl`` files.

Usage: python tools/plot_loss.py RUN.jsonl [MORE.jsonl ...] --output loss.png [--x data_tokens]

Each file is one curve (labelled by its file name); the TST phase boundary is marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(paths: list[Path], output: Path, x_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for path in paths:
        records = read_records(path)
        train = [r for r in records if "lm_loss" in r]
        if not train:
            raise SystemExit(f"error: {path} holds no training records")
        xs = [r["iteration"] if x_key == "iteration" else r[x_key] for r in train]
        (line,) = ax.plot(xs, [r["lm_loss"] for r in train], label=f"{path.stem} train")
        boundary = next((r for r in train if r["phase"] == 2), None)
        if boundary is not None and train[0]["phase"] == 1:
            bx = boundary["iteration"] if x_key == "iteration" else boundary[x_key]
            ax.axvline(bx, color=line.get_color(), linestyle=":", alpha=0.7)
        valid = [r for r in records if "valid_lm_loss" in r]
        if valid:
            by_iter = {r["iteration"]: r for r in train}
            vx = [
                r["iteration"] if x_key == "iteration" else by_iter[r["iteration"]][x_key]
                for r in valid
                if r["iteration"] in by_iter
            ]
            vy = [r["valid_lm_loss"] for r in valid if r["iteration"] in by_iter]
            ax.plot(vx, vy, "o--", color=line.get_color(), label=f"{path.stem} valid")
    ax.set_xlabel("data tokens" if x_key == "data_tokens" else "iteration")
    ax.set_ylabel("lm loss (nats)")
    ax.set_title("TST pre-training (dotted line: phase boundary)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="--metrics-jsonl files")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--x", choices=["iteration", "data_tokens"], default="iteration")
    args = parser.parse_args(argv)
    for path in args.metrics:
        if not path.is_file():
            parser.error(f"{path} does not exist")
    plot(args.metrics, args.output, args.x)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
