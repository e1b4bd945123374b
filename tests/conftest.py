"""Shared pytest setup.

The repository root goes on ``sys.path`` so that ``tst_megatron`` imports without an
installation, both here and in the CPU ranks that ``tst_megatron.testing.multirank`` starts
(they take the parent's ``sys.path``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
