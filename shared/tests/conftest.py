"""The shared library's tests read topics with topic_reading.py beside this file.

The suite runs with ``--import-mode=importlib``, which puts no test folder on sys.path; this
folder is added so the test modules can import that helper module by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
