"""tests/results: SR/SEG/report/similar-case tests. Unit tests use ``results_inputs``; the
node tests reuse ``tests/e2e/node_process.py`` (put on sys.path here, as tests/reliability does).
"""

from __future__ import annotations

import sys
from pathlib import Path

_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)
