from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Test helpers (tiny_models, fixtures) are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two OpenMP threads on a shared 2-core machine made torch ops 20x slower; use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
