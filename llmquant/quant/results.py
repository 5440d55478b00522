"""The format-neutral quantization result of one decoder block (pure data, no file format).

The run folder (``llmquant.runfolder``) saves one per block; every writer reads them back and
only packs (ARCHITECTURE.md principle 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmquant.quant.grid import GroupedCodes


@dataclass
class LinearResult:
    """One linear layer: transformed float weight, optional integer codes, activation stats."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    weight: torch.Tensor  # float [out, in], transformed (scales folded, clip applied)
    codes: GroupedCodes | None = None
    mean_abs: torch.Tensor | None = None  # [in]
    mean_sq: torch.Tensor | None = None  # [in]
    n_tokens: int = 0


@dataclass
class BlockResult:
    index: int
    tensors: dict[str, torch.Tensor]  # every float tensor of the block by full name
    linears: dict[str, LinearResult]  # by module path
    info: dict = field(default_factory=dict)  # losses and timings, JSON-serialisable
