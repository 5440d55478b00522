"""The Quantizer interface that scale and clip search call, and its integer-grid implementation.

DESIGN.md principle 4: the quantizer of the target format is the one that is searched. A search
only ever calls ``fake_quant(w, importance, clip)``; the integer grids here and the GGML block
types in ``llmquant.quant.ggml`` both implement it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from llmquant.quant import grid as int_grid


@runtime_checkable
class Quantizer(Protocol):
    """What scale search, clip search and the pipeline need from a weight quantizer."""

    name: str
    # Input channels that share one range; clip search shrinks ranges at this granularity.
    clip_group_size: int

    def check(self, module_name: str, in_features: int) -> None:
        """Raise ValueError naming the module when its input width does not fit the format."""

    def fake_quant(
        self,
        w: torch.Tensor,
        importance: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize ``w`` [out, in]; importance [in]; clip [out, n_clip_groups]."""


def clamp_to_clip(w: torch.Tensor, group_size: int, clip: torch.Tensor) -> torch.Tensor:
    """Clamp each group of ``w`` [out, in] to its own range shrunk by ``clip`` [out, n_groups].

    For min/max grids this is identical to shrinking the range when choosing the scale, so any
    quantizer can be clipped by quantizing the clamped weight.
    """
    groups = int_grid.group_view(w, group_size)  # [out, n_groups, group]
    upper = groups.amax(dim=-1, keepdim=True).clamp(min=0) * clip.unsqueeze(-1)
    lower = groups.amin(dim=-1, keepdim=True).clamp(max=0) * clip.unsqueeze(-1)
    return torch.maximum(torch.minimum(groups, upper), lower).reshape(w.shape)  # [out, in]


class IntQuantizer:
    """Grouped integer round-to-nearest (the grid of AutoAWQ and compressed-tensors outputs)."""

    def __init__(self, grid: int_grid.IntGrid) -> None:
        self.grid = grid
        self.name = grid.describe()

    @property
    def clip_group_size(self) -> int:
        return self.grid.group_size

    def check(self, module_name: str, in_features: int) -> None:
        try:
            self.grid.groups_for(in_features)
        except ValueError as err:
            raise ValueError(f"{module_name}: {err}") from None

    def quantize(self, w: torch.Tensor, clip: torch.Tensor | None = None) -> int_grid.GroupedCodes:
        return int_grid.quantize(w, self.grid, clip)

    def fake_quant(
        self,
        w: torch.Tensor,
        importance: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return int_grid.fake_quant(w, self.grid, clip)


@dataclass
class QuantizerPlan:
    """Which quantizer each linear (full module path) is searched and quantized with."""

    name: str
    quantizer_for: Callable[[str], Quantizer]
