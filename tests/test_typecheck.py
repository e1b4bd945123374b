"""mypy (basic mode) on the whole library, the tools and the entry point: the paths of
``[tool.mypy] files`` in pyproject.toml. About 13 s of CPU on a cold cache (it reads torch's
types), ~1 s warm."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed in this environment: pip install -e '.[test]'",
)
def test_typed_modules_pass_mypy():
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],  # cache in .mypy_cache: ~1 s once warm
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_the_checked_paths_exist():
    """The library, the tools and the entry point are checked; a renamed path must not drop
    out of the check silently."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert {"tst_megatron", "tools", "pretrain_tst.py"} <= set(files)
    assert [path for path in files if not (ROOT / path).exists()] == []
