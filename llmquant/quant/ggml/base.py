"""The common shape of a GGML block type: validation, row chunking, bytes in and out, fake_quant.

A subclass only says how one batch of blocks becomes bytes (``_encode_blocks``) and back
(``_decode_blocks``). Everything stays in torch on the weight's device until ``quantize`` hands
back numpy bytes, so ``fake_quant`` (what AWQ search calls thousands of times) never leaves it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmquant.quant.ggml.numerics import div, seq_sum
from llmquant.quant.grid import clamp_to_clip

# Rows are encoded in chunks of about this many weights to bound the temporaries (a K-quant
# fit keeps roughly ten float32 copies of its chunk alive).
CHUNK_ELEMENTS = 1 << 21


class GGMLType(ABC):
    """One GGML tensor type: ``quantize`` gives llama.cpp's exact bytes, ``dequantize`` reads them.

    ``importance`` is the mean x^2 of each input channel (llama.cpp's imatrix); without it every
    type reproduces ``llama-quantize`` without ``--imatrix``, with it the imatrix code path.
    """

    name: ClassVar[str]
    type_id: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # Input channels that share one range (the smallest scaled group): what clip search shrinks.
    clip_group_size: ClassVar[int]
    # False: the bytes do not depend on importance (Q8_0 and the float types, as in llama.cpp),
    # so a run that writes only such types needs no activation statistics for them.
    uses_importance: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"GGMLType({self.name})"

    def check(self, module_name: str, in_features: int) -> None:
        """Raise ValueError naming ``module_name`` when rows of ``in_features`` do not fit."""
        if in_features % self.block_size == 0:
            return
        from llmquant.quant.ggml import fitting_types

        fits = ", ".join(fitting_types(in_features)) or "none"
        raise ValueError(
            f"{module_name}: in_features {in_features} is not a multiple of the {self.name} "
            f"block size {self.block_size}; GGML types that fit this width: {fits}"
        )

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
        """[rows, cols] weights -> uint8 [rows, cols // block_size * type_size], GGUF bytes."""
        return self.encode(w, importance).cpu().numpy()

    def dequantize(self, data: np.ndarray, cols: int) -> torch.Tensor:
        """uint8 [rows, row_bytes] GGUF bytes -> float32 [rows, cols]."""
        raw = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
        return self.decode(raw.reshape(raw.shape[0], -1), cols)

    def fake_quant(
        self,
        w: torch.Tensor,
        importance: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``dequantize(quantize(w))`` in torch; ``clip`` [out, in // clip_group_size]."""
        if clip is not None:
            w = clamp_to_clip(w.float(), self.clip_group_size, clip)
        return self.decode(self.encode(w, importance), w.shape[1]).to(w.dtype)

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, cols] -> uint8 tensor [rows, row_bytes] on ``w``'s device."""
        if w.dim() != 2:
            raise ValueError(
                f"{self.name}: expected a 2-D weight [rows, cols], got {tuple(w.shape)}"
            )
        rows, cols = w.shape
        self.check("weight", cols)
        weights = None
        if importance is not None:
            if importance.shape != (cols,):
                got = tuple(importance.shape)
                raise ValueError(f"{self.name}: importance must have shape ({cols},), got {got}")
            weights = importance.to(device=w.device, dtype=torch.float32)
        x = w.detach().to(torch.float32).contiguous()
        n_blocks = cols // self.block_size
        row_bytes = n_blocks * self.type_size
        out = torch.empty(rows, row_bytes, dtype=torch.uint8, device=w.device)
        chunk = max(1, CHUNK_ELEMENTS // cols)
        for start in range(0, rows, chunk):
            part = x[start : start + chunk]  # [chunk_rows, cols]
            blocks = part.reshape(-1, self.block_size)  # [chunk_rows * n_blocks, block]
            block_weights = None
            if weights is not None:
                block_weights = weights.reshape(1, n_blocks, self.block_size)
                block_weights = block_weights.expand(part.shape[0], -1, -1)
                block_weights = block_weights.reshape(-1, self.block_size)  # [N, block]
            raw = self._encode_blocks(blocks, block_weights, part)  # [N, type_size]
            out[start : start + chunk] = raw.reshape(part.shape[0], row_bytes)
        return out

    def decode(self, raw: torch.Tensor, cols: int) -> torch.Tensor:
        """uint8 tensor [rows, row_bytes] -> float32 [rows, cols] on ``raw``'s device."""
        rows = raw.shape[0]
        if cols % self.block_size:
            raise ValueError(f"{self.name}: cols {cols} is not a multiple of {self.block_size}")
        expected = cols // self.block_size * self.type_size
        if raw.shape[1] != expected:
            raise ValueError(
                f"{self.name}: {cols} columns take {expected} bytes per row, got {raw.shape[1]}"
            )
        blocks = raw.reshape(-1, self.type_size)  # [rows * n_blocks, type_size]
        return self._decode_blocks(blocks).reshape(rows, cols)  # [rows, cols]

    @abstractmethod
    def _encode_blocks(
        self, blocks: torch.Tensor, weights: torch.Tensor | None, rows: torch.Tensor
    ) -> torch.Tensor:
        """[N, block_size] float32 (+ importance per element, whole rows) -> [N, type_size]."""

    @abstractmethod
    def _decode_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        """[N, type_size] uint8 -> [N, block_size] float32."""


def row_sigma2(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean x^2 of each row, repeated for each of its blocks: [rows, cols] -> [rows * n_blocks].

    The legacy types' imatrix path weights x by sqrt(sigma2 + x^2) with this row-wide sigma2.
    """
    sigma2 = div(seq_sum(rows * rows), float(rows.shape[1]))  # [rows]
    return sigma2.repeat_interleave(rows.shape[1] // block_size)
