"""Shared set-up of the CPU suite: the script is importable from the repository root, and every test starts
with empty in-process run caches (the run cache keeps trained modules alive otherwise)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import HoloMambaRec as H  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_run_cache():
    H._RUN_CACHE.clear()
    yield
    H._RUN_CACHE.clear()
