"""Import a script from tools/ (not a package) in tests."""

import importlib
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def import_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` without leaving tools/ on sys.path."""
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TOOLS))
