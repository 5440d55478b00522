"""Find and call the llama.cpp build made by ``tools/build_llamacpp.sh``.

That script builds llama.cpp (from the llama-cpp-python 0.3.36 sdist) once into
``$LLMQUANT_LLAMACPP_DIR`` (default ``~/.cache/llmquant/llamacpp-0.3.36``): the tools in
``bin/`` and the ``llama_cpp`` Python binding, which uses the same shared libraries, in
``python/``. This module locates them (:class:`LlamaCppMissing` says how to build them), runs
the tools and opens a GGUF file through the binding for the evaluator. The byte-level oracles
the tests compare against live in ``tests/llamacpp_fixtures.py``.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from llmquant.errors import EnvironmentFailure

logger = logging.getLogger(__name__)

ENV_VAR = "LLMQUANT_LLAMACPP_DIR"
VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-completion")
BUILD_HINT = "run `bash tools/build_llamacpp.sh` (or point LLMQUANT_LLAMACPP_DIR at its output)"


class LlamaCppMissing(EnvironmentFailure, FileNotFoundError):
    """The llama.cpp build is missing or incomplete; the message says how to build it."""


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
    """The build under ``root`` (default_dir()); LlamaCppMissing names what is missing."""
    tools = LlamaCppTools(root or default_dir())
    missing = [tools.tool(name) for name in TOOLS if not tools.tool(name).is_file()]
    for path in (tools.bin / "libggml-base.so", tools.python / "llama_cpp" / "lib" / "libllama.so"):
        if not path.is_file():
            missing.append(path)
    if missing:
        listed = ", ".join(str(path) for path in missing)
        raise LlamaCppMissing(f"llama.cpp build incomplete, missing: {listed}; {BUILD_HINT}")
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
