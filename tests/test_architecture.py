"""The import rules of docs/architecture.md, and one home for tokenizer loading.

Parses the sources (nothing is imported), so it runs in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tst_megatron"
METHOD = {"config", "bags", "loss", "targets", "model"}
# What each part of tst_megatron may import from tst_megatron (docs/architecture.md).
ALLOWED = {
    **{name: METHOD for name in METHOD},
    "settings": {"settings", "config", "kernels"},
    "data": {"data", "config", "targets", "settings"},
    "training": METHOD
    | {"data", "training", "planning", "cpu", "mcore_fixes", "mcore_compat", "kernels", "layers"}
    | {"settings"},
    "planning": METHOD | {"planning", "training", "settings"},
    "conversion": METHOD | {"conversion", "data", "training", "cpu", "mcore_compat", "settings"},
    "cpu": {"cpu", "layers", "mcore_compat"},
    "mcore_fixes": {"mcore_compat"},
    "mcore_compat": set(),
    "kernels": set(),
    "layers": {"layers", "kernels", "training", "mcore_compat"},
    "testing": METHOD | {"testing", "training", "mcore_compat", "settings"},
}
# Imports allowed from one module only.
ONLY_FROM = {
    ("training", "planning"): {"training/loop.py"},
    ("training", "cpu"): {"training/model_builder.py", "training/loop.py"},
    ("conversion", "cpu"): {"conversion/megatron_io.py"},
    ("layers", "training"): {"layers/spec.py"},
}
# Calls that load a tokenizer's files; they belong in tst_megatron/data/tokenizer.py alone.
TOKENIZER_LOADING = ("Tokenizer.from_file(", "SentencePieceProcessor(", "models.BPE",
                     "AutoTokenizer.from_pretrained(")  # fmt: skip
PRODUCT_CODE = ["tst_megatron", "tools", "benchmarks", "scripts", "examples", "pretrain_tst.py"]


def part_of(path: Path) -> str:
    """``config`` for tst_megatron/config.py, ``data`` for tst_megatron/data/*.py."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imported_parts(path: Path) -> set[str]:
    """The parts of tst_megatron ``path`` imports (at any depth of the file)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tst_megatron":
                names = [f"tst_megatron.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        parts |= {name.split(".")[1] for name in names if name.startswith("tst_megatron.")}
    return parts


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_architecture_table(path):
    part = part_of(path)
    assert part in ALLOWED, f"{part} is a new part of tst_megatron: add it to docs/architecture.md"
    relative = str(path.relative_to(PACKAGE))
    for imported in imported_parts(path) - {part}:
        assert imported in ALLOWED[part], (
            f"tst_megatron/{relative} imports tst_megatron.{imported}, which "
            f"docs/architecture.md does not allow for {part}"
        )
        only = ONLY_FROM.get((part, imported))
        assert only is None or relative in only, (
            f"tst_megatron/{relative}: only {', '.join(sorted(only))} may import {imported}"
        )


def test_tokenizers_are_loaded_in_one_place():
    home = PACKAGE / "data" / "tokenizer.py"
    files = [p for name in PRODUCT_CODE for p in sorted((ROOT / name).rglob("*.py"))]
    files += [ROOT / "pretrain_tst.py"]
    offenders = [
        f"{path.relative_to(ROOT)}: {call}"
        for path in files
        if path != home and path.is_file()
        for call in TOKENIZER_LOADING
        if call in path.read_text(encoding="utf-8")
    ]
    assert not offenders, "load tokenizers through tst_megatron.data.tokenizer: " + "; ".join(
        offenders
    )
    assert all(call in home.read_text(encoding="utf-8") for call in TOKENIZER_LOADING[:3])


def test_product_code_never_imports_the_tests():
    """The test helpers (tests/support/) are not installed: nothing that ships imports them."""
    files = [p for name in PRODUCT_CODE for p in sorted((ROOT / name).rglob("*.py"))]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "tests"
            ]
    assert not offenders, "product code imports the test suite: " + "; ".join(offenders)
