"""Where the tests find real data: the bundled sample, and the shared real-data folder beside the repo."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FOLDFORGE_TEST_DATA", REPO.parent / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real-data folder {SHARED} not present")
