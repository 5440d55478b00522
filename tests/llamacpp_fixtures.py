"""Fixtures and oracles for tests that need llama.cpp (built by ``tools/build_llamacpp.sh``).

The oracles (llama.cpp's logits and tokenization through its binding, ggml's own quantizer
``ggml_quantize_chunk`` from libggml-base) are what our outputs are checked against; llmquant
itself only runs the tools and the binding (``llmquant.evaluate.llamacpp_tools``).

Missing build: the test fails when the ``CI`` environment variable is set (CI must build it, a
skip there would hide a broken setup) and is skipped otherwise. Use from conftest.py with
``from llamacpp_fixtures import llamacpp_logits, llamacpp_tokenize, llamacpp_tools``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmquant.evaluate import llamacpp_tools as lct
from llmquant.evaluate.llamacpp_tools import load_binding, locate, open_llama


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
        return logits(gguf_path, token_ids, root=llamacpp_tools.root, **kwargs)

    return run


@pytest.fixture(scope="session")
def llamacpp_tokenize(llamacpp_tools) -> Callable[[Path, str], list[int]]:
    """``(gguf_path, text) -> token ids`` as llama.cpp tokenizes (BOS if the file says so)."""

    def run(gguf_path: Path, text: str) -> list[int]:
        return tokenize(gguf_path, text, root=llamacpp_tools.root)

    return run


def logits(
    gguf_path: Path,
    token_ids: list[int],
    *,
    n_threads: int = 1,
    flash_attn: bool = False,
    root: Path | None = None,
) -> np.ndarray:
    """llama.cpp's logits at every position of ``token_ids`` (no BOS added): [n_tokens, n_vocab]."""
    model = open_llama(gguf_path, max(len(token_ids), 16), n_threads=n_threads,
                       flash_attn=flash_attn, root=root)  # fmt: skip
    try:
        model.eval(list(token_ids))
        return np.array(model.scores[: model.n_tokens], dtype=np.float32)
    finally:
        model.close()


def tokenize(gguf_path: Path, text: str, *, root: Path | None = None) -> list[int]:
    """llama.cpp's token ids for ``text``, with BOS when the file says to add it."""
    llama_cpp = load_binding(root)
    model = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return list(model.tokenize(text.encode("utf-8"), add_bos=True, special=True))
    finally:
        model.close()


@functools.cache
def _ggml_base(root: Path | None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(locate(root).bin / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(
    weights: np.ndarray,
    type_id: int,
    importance: np.ndarray | None = None,
    *,
    root: Path | None = None,
) -> np.ndarray:
    """ggml's own quantizer (what llama-quantize calls per tensor): [rows, cols] -> bytes.

    ``importance`` [cols] plays the imatrix; returns uint8 [rows, row_size].
    """
    lib = _ggml_base(root)
    source = np.ascontiguousarray(weights, dtype=np.float32)
    rows, cols = source.shape
    out = np.zeros((rows, lib.ggml_row_size(int(type_id), cols)), dtype=np.uint8)
    imatrix = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (cols,):
            raise ValueError(f"importance must have shape ({cols},), got {importance.shape}")
        imatrix = importance.ctypes.data
    lib.ggml_quantize_chunk(
        int(type_id), source.ctypes.data, out.ctypes.data, 0, rows, cols, imatrix
    )
    return out


def llama_perplexity(tools: lct.LlamaCppTools, *args: str | Path, attempts: int = 3) -> float:
    """``llama-perplexity``'s final PPL. Its logger writes from a worker thread and can lose
    the last lines when the process exits on a loaded machine (exit code 0, no "Final
    estimate"); such a run is repeated, up to ``attempts`` times."""
    out = ""
    for _ in range(attempts):
        out = tools.run("llama-perplexity", *args)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        if found:
            return float(found.group(1))
    raise AssertionError(f"no final estimate in {attempts} runs; last output:\n{out[-3000:]}")

