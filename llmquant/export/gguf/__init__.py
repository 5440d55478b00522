"""GGUF export: one streaming writer, llama.cpp's quantization mixes, tokenizer metadata."""

from __future__ import annotations

from llmquant.export.gguf.mixes import MIXES, ArchInfo, get_mix, tensor_types
from llmquant.export.gguf.names import TensorMapper, arch_info, resolve_gguf_arch
from llmquant.export.gguf.writer import FolderTensors, RunTensors, write_gguf

__all__ = [
    "MIXES",
    "ArchInfo",
    "FolderTensors",
    "RunTensors",
    "TensorMapper",
    "arch_info",
    "get_mix",
    "resolve_gguf_arch",
    "tensor_types",
    "write_gguf",
]
