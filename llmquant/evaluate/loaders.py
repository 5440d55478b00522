"""Open any output as something the evaluator can run: streamed torch models or llama.cpp.

- a Hugging Face folder: streamed from its safetensors;
- an AutoAWQ GEMM or compressed-tensors folder: streamed, each packed linear dequantized by our
  readers when its block is loaded (never the whole model in memory);
- a GGUF file: run by llama.cpp (the reported number), or dequantized into torch through
  transformers' GGUF loader to separate format loss from runtime differences.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from llmquant.export import awq_gemm, compressed_tensors
from llmquant.export.common import TensorFolder, detect_format
from llmquant.model.source import resolve_model
from llmquant.model.stream import StreamedModel

log = logging.getLogger(__name__)


class DequantizingIndex:
    """The WeightIndex interface over a packed folder: ``M.weight`` is unpacked on demand."""

    def __init__(
        self, folder: Path, marker: str, consumed: tuple[str, ...], unpack: Callable
    ) -> None:
        self.tensors = TensorFolder(folder)
        self.unpack = unpack
        self.packed: set[str] = set()
        self.plain: dict[str, str] = {}
        for name in self.tensors.names():
            if name.endswith("." + marker):
                module = name[: -len(marker) - 1]
                self.packed.add(module + ".weight")
            elif not any(name.endswith("." + s) for s in consumed):
                self.plain[name] = name

    def names(self) -> list[str]:
        return [*self.plain, *self.packed]

    def __contains__(self, name: str) -> bool:
        return name in self.plain or name in self.packed

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            if name in self.packed:
                out[name] = self.unpack(self.tensors, name.removesuffix(".weight"))
            elif name in self.plain:
                out[name] = self.tensors.get(name)
            else:
                raise KeyError(f"{self.tensors.folder}: tensor {name!r} not found")
        return out


def _awq_index(folder: Path) -> DequantizingIndex:
    def unpack(tensors: TensorFolder, module: str) -> torch.Tensor:
        return awq_gemm.dequantize_awq(
            tensors.get(f"{module}.qweight"),
            tensors.get(f"{module}.qzeros"),
            tensors.get(f"{module}.scales"),
        ).float()

    return DequantizingIndex(folder, "qweight", awq_gemm.PACKED_SUFFIXES, unpack)


def _ct_index(folder: Path, config: dict) -> DequantizingIndex:
    from llmquant.quant.grid import dequantize

    named, default = compressed_tensors.grid_by_module(config)

    def unpack(tensors: TensorFolder, module: str) -> torch.Tensor:
        zp = f"{module}.weight_zero_point"
        codes = compressed_tensors.unpack_linear(
            tensors.get(f"{module}.weight_packed"),
            tensors.get(f"{module}.weight_scale"),
            tensors.get(f"{module}.weight_shape"),
            tensors.get(zp) if zp in tensors else None,
            named.get(module, default),
        )
        return dequantize(codes)

    return DequantizingIndex(folder, "weight_packed", compressed_tensors.PACKED_SUFFIXES, unpack)


def open_streamed(path: str | Path, dtype: str = "float32") -> tuple[StreamedModel, str]:
    """(streamed torch model, format) for a folder, a GGUF (dequantized) or ``default``."""
    if str(path) == "default" or str(path).endswith(".gguf"):
        return StreamedModel(resolve_model(str(path)), dtype), (
            "hf" if str(path) == "default" else "gguf-dequantized"
        )
    folder = Path(path)
    kind = detect_format(folder)
    if kind == "hf":
        return StreamedModel(folder, dtype), kind
    config = AutoConfig.from_pretrained(folder)
    quant_config = dict(getattr(config, "quantization_config", None) or {})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if kind == "awq-gemm":
        index = _awq_index(folder)
    else:
        index = _ct_index(folder, quant_config)
    return StreamedModel(folder, dtype, index=index, config=config), kind


class LlamaCppRunner:
    """All-position logits of a GGUF file from llama.cpp, one model load for many windows."""

    def __init__(self, gguf_path: Path, n_ctx: int, n_threads: int = 2) -> None:
        from llmquant.evaluate.llamacpp_tools import open_llama

        self.model = open_llama(gguf_path, n_ctx, n_threads=n_threads)

    def window_logits(self, windows: torch.Tensor) -> Iterator[torch.Tensor]:
        for row in windows.tolist():
            self.model.reset()
            self.model.eval(row)
            scores = np.array(self.model.scores[: self.model.n_tokens], dtype=np.float32)
            yield torch.from_numpy(scores).unsqueeze(0)  # [1, seq, vocab]

    def close(self) -> None:
        self.model.close()
