from __future__ import annotations

import sys
from pathlib import Path

# Test helpers (tiny_models, fixtures) are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
