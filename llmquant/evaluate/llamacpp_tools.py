"""Find and call the llama.cpp build made by ``tools/build_llamacpp.sh``.

That script builds llama.cpp (from the llama-cpp-python 0.3.36 sdist) once into
``$LLMQUANT_LLAMACPP_DIR`` (default ``~/.cache/llmquant/llamacpp-0.3.36``): the tools in
``bin/`` and the ``llama_cpp`` Python binding, which uses the same shared libraries, in
``python/``. This module locates them (a clear FileNotFoundError when missing), runs the tools,
and gives all-position logits and tokenization through the binding, plus direct access to
ggml's own quantizer (``ggml_quantize_chunk`` in libggml-base) as a byte-level oracle.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

logger = logging.getLogger(__name__)

ENV_VAR = "LLMQUANT_LLAMACPP_DIR"
VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-completion")
BUILD_HINT = "run `bash tools/build_llamacpp.sh` (or point LLMQUANT_LLAMACPP_DIR at its output)"


def default_dir() -> Path:
    """``$LLMQUANT_LLAMACPP_DIR`` or ``~/.cache/llmquant/llamacpp-0.3.36``."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "llmquant" / f"llamacpp-{VERSION}"


@dataclass(frozen=True)
class LlamaCppTools:
    """A complete build: ``bin`` holds the tools and shared libraries, ``python`` the binding."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.root / "python"

    def tool(self, name: str) -> Path:
        return self.bin / name

    def run(self, name: str, *args: str | Path, timeout: float = 600) -> str:
        """Run tool ``name``; returns stdout + stderr, raises RuntimeError when it fails."""
        command = [str(self.tool(name)), *map(str, args)]
        logger.debug("running %s", " ".join(command))
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {output[-3000:]}")
        return output


def locate(root: Path | None = None) -> LlamaCppTools:
    """The build under ``root`` (default_dir()); FileNotFoundError names what is missing."""
    tools = LlamaCppTools(root or default_dir())
    missing = [tools.tool(name) for name in TOOLS if not tools.tool(name).is_file()]
    for path in (tools.bin / "libggml-base.so", tools.python / "llama_cpp" / "lib" / "libllama.so"):
        if not path.is_file():
            missing.append(path)
    if missing:
        listed = ", ".join(str(path) for path in missing)
        raise FileNotFoundError(f"llama.cpp build incomplete, missing: {listed}; {BUILD_HINT}")
    return tools


@functools.cache
def load_binding(root: Path | None = None) -> ModuleType:
    """Import ``llama_cpp`` from the build (its ``lib/`` holds the build's shared libraries)."""
    tools = locate(root)
    if str(tools.python) not in sys.path:
        sys.path.insert(0, str(tools.python))
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(tools.python / "llama_cpp" / "lib"))
    import llama_cpp

    return llama_cpp


def open_llama(gguf_path: Path, n_ctx: int, *, n_threads: int = 1, flash_attn: bool = False,
               root: Path | None = None):  # fmt: skip
    """A ``llama_cpp.Llama`` that keeps the logits of every position, with an F32 KV cache.

    With the F32 cache (type_k = type_v = 0) an F32 model matches a float32 reference to about
    1e-5 relative; with llama.cpp's default F16 cache the error is about 10x larger.
    """
    llama_cpp = load_binding(root)
    return llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        type_k=0,
        type_v=0,
        flash_attn=flash_attn,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )


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
