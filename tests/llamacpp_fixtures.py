"""Fixtures for tests that need llama.cpp (built by ``tools/build_llamacpp.sh``).

Missing build: the test fails when the ``CI`` environment variable is set (CI must build it, a
skip there would hide a broken setup) and is skipped otherwise. Use from conftest.py with
``from llamacpp_fixtures import llamacpp_logits, llamacpp_tokenize, llamacpp_tools``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmquant.evaluate import llamacpp_tools as lct


def require_llamacpp() -> lct.LlamaCppTools:
    """The build, or fail (``CI`` set) / skip the calling test with the build instructions."""
    try:
        return lct.locate()
    except FileNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def llamacpp_tools() -> lct.LlamaCppTools:
    """The llama.cpp build: ``.bin`` (tools and libraries), ``.run(tool, *args)``."""
    return require_llamacpp()


@pytest.fixture(scope="session")
def llamacpp_logits(llamacpp_tools) -> Callable[[Path, list[int]], np.ndarray]:
    """``(gguf_path, token_ids) -> [n_tokens, n_vocab]`` float32 logits, F32 KV cache."""

    def run(gguf_path: Path, token_ids: list[int], **kwargs) -> np.ndarray:
        return lct.logits(gguf_path, token_ids, root=llamacpp_tools.root, **kwargs)

    return run


@pytest.fixture(scope="session")
def llamacpp_tokenize(llamacpp_tools) -> Callable[[Path, str], list[int]]:
    """``(gguf_path, text) -> token ids`` as llama.cpp tokenizes (BOS if the file says so)."""

    def run(gguf_path: Path, text: str) -> list[int]:
        return lct.tokenize(gguf_path, text, root=llamacpp_tools.root)

    return run
