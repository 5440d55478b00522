"""Open any output as something the evaluator can run: streamed torch models or llama.cpp.

- a Hugging Face folder: streamed from its safetensors;
- an AutoAWQ GEMM or compressed-tensors folder: streamed, each packed linear dequantized by our
  readers when its block is loaded (never the whole model in memory);
- a GGUF file: run by llama.cpp (the reported number), or dequantized into torch through
  transformers' GGUF loader to separate format loss from runtime differences.
Which is which, and how each unpacks, is the format registry's (``llmquant.formats``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from llmquant.formats import open_output
from llmquant.model.source import resolve_model
from llmquant.model.stream import StreamedModel

log = logging.getLogger(__name__)


def open_streamed(
    path: str | Path, dtype: torch.dtype | str = "float32", device: torch.device | str = "cpu"
) -> tuple[StreamedModel, str]:
    """(streamed torch model, format) for a folder, a GGUF (dequantized) or ``default``;
    its blocks run on ``device`` in ``dtype``."""
    if str(path) == "default":
        return StreamedModel(resolve_model("default"), dtype, device=device), "hf"
    source, kind = open_output(Path(path))
    if kind == "hf":
        return StreamedModel(Path(path), dtype, device=device), kind
    if kind == "gguf":
        return StreamedModel(source.folder, dtype, device=device), "gguf-dequantized"
    # A packed folder: the plain architecture, its linears unpacked block by block.
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return StreamedModel(Path(path), dtype, index=source, config=config, device=device), kind


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
