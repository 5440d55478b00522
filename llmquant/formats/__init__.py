"""The format registry: every quantization format and output format, looked up by name.

Adding a format is one module defining a registered subclass of
:class:`~llmquant.formats.base.QuantFormat` or :class:`~llmquant.formats.base.OutputFormat`,
plus its import below.
"""

from __future__ import annotations

from pathlib import Path

from llmquant.errors import InputError
from llmquant.formats import gguf, int_grid, safetensors_exports  # noqa: F401  (registration)
from llmquant.formats.base import (
    OUTPUT_FORMATS,
    QUANT_FORMATS,
    OutputFormat,
    PlanContext,
    QuantFormat,
)
from llmquant.tensors import SafetensorsFolder, TensorSource, read_config


def quant_format(name: str) -> QuantFormat:
    return QUANT_FORMATS[name]


def output_format(kind: str) -> OutputFormat:
    return OUTPUT_FORMATS[kind]


def detect_format(path: Path) -> str:
    """What ``path`` holds: an output format's kind ("gguf", "awq-gemm", ...) or "hf"."""
    path = Path(path)
    if path.is_file():
        if OUTPUT_FORMATS["gguf"].detect(path, {}):
            return "gguf"
        raise InputError(f"{path}: a file that is not GGUF (expected a .gguf file or a folder)")
    quant = read_config(path).get("quantization_config") or {}
    if not quant.get("quant_method"):
        return "hf"
    for kind, fmt in OUTPUT_FORMATS.items():
        if fmt.quant_method is not None and fmt.detect(path, quant):
            return kind
    method = quant.get("quant_method")
    raise InputError(f"{path}/config.json: unsupported quantization_config.quant_method {method!r}")


def open_output(path: Path) -> tuple[TensorSource, str]:
    """The plain model's tensors of any output (packed linears unpacked) and its format."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "hf":
        return SafetensorsFolder(path), kind
    quant = {} if path.is_file() else read_config(path).get("quantization_config") or {}
    return OUTPUT_FORMATS[kind].open(path, quant), kind


__all__ = [
    "OUTPUT_FORMATS",
    "QUANT_FORMATS",
    "OutputFormat",
    "PlanContext",
    "QuantFormat",
    "detect_format",
    "open_output",
    "output_format",
    "quant_format",
]
