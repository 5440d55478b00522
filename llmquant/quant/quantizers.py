"""The Quantizer interface that scale and clip search call, and its two implementations.

ARCHITECTURE.md principle 4: the quantizer of the target format is the one that is searched. A
search only ever calls ``fake_quant(w, importance, clip)``. :class:`IntQuantizer` (the grouped
integer grid of the safetensors formats) also produces integer codes that writers pack as they are;
:class:`GgmlQuantizer` (a GGML block type of ``llmquant.quant.ggml``) does not: its bytes are
made by the writer from the transformed float weight, with the same kernel. Every quantizer has
a JSON ``spec`` that the run folder persists and :func:`quantizer_from_spec` rebuilds.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from llmquant.dtypes import DTYPES, dtype_name
from llmquant.quant import grid as int_grid
from llmquant.quant.ggml import GGMLType, get_ggml_type


@runtime_checkable
class Quantizer(Protocol):
    """What scale search, clip search, the run folder and the writers need from a quantizer."""

    name: str
    # Input channels that share one range; clip search shrinks ranges at this granularity.
    clip_group_size: int
    # True: ``quantize_codes`` gives the integer codes a writer packs unchanged.
    produces_codes: bool
    # True: ``fake_quant`` and the written bytes depend on the importance (mean x²) passed.
    needs_importance: bool

    def spec(self) -> dict:
        """JSON description that :func:`quantizer_from_spec` turns back into this quantizer."""

    def check(self, module_name: str, in_features: int) -> None:
        """Raise ValueError naming the module when its input width does not fit the format."""

    def fake_quant(
        self,
        w: torch.Tensor,
        importance: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize ``w`` [out, in]; importance [in]; clip [out, n_clip_groups]."""


class IntQuantizer:
    """Grouped integer round-to-nearest (the grid of AutoAWQ and compressed-tensors outputs)."""

    produces_codes = True
    needs_importance = False

    def __init__(self, grid: int_grid.IntGrid) -> None:
        self.grid = grid
        self.name = grid.describe()

    @property
    def clip_group_size(self) -> int:
        return self.grid.group_size

    def spec(self) -> dict:
        return {
            "kind": "int",
            "bits": self.grid.bits,
            "group_size": self.grid.group_size,
            "symmetric": self.grid.symmetric,
            "scale_dtype": dtype_name(self.grid.scale_dtype),
            "min_scale": self.grid.min_scale,
        }

    def check(self, module_name: str, in_features: int) -> None:
        try:
            self.grid.groups_for(in_features)
        except ValueError as err:
            raise ValueError(f"{module_name}: {err}") from None

    def quantize_codes(
        self, w: torch.Tensor, clip: torch.Tensor | None = None
    ) -> int_grid.GroupedCodes:
        return int_grid.quantize(w, self.grid, clip)

    def fake_quant(
        self,
        w: torch.Tensor,
        importance: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return int_grid.fake_quant(w, self.grid, clip)


class GgmlQuantizer:
    """A GGML block type, with or without importance (llama.cpp's imatrix) in its block fitting.

    ``importance=False`` ignores the importance a search passes, so the search sees exactly the
    rounding of a file written without an imatrix.
    """

    produces_codes = False

    def __init__(self, ggml_type: GGMLType, importance: bool = True) -> None:
        self.ggml_type = ggml_type
        self.importance = importance
        self.name = ggml_type.name
        self.clip_group_size = ggml_type.clip_group_size
        self.needs_importance = importance and ggml_type.uses_importance

    def spec(self) -> dict:
        return {"kind": "ggml", "type": self.name, "importance": self.importance}

    def check(self, module_name: str, in_features: int) -> None:
        self.ggml_type.check(module_name, in_features)

    def fake_quant(
        self,
        w: torch.Tensor,
        importance: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.ggml_type.fake_quant(w, importance if self.importance else None, clip)


def quantizer_from_spec(spec: dict) -> Quantizer:
    """The quantizer a persisted ``spec`` describes; ValueError for an unknown kind."""
    kind = spec.get("kind")
    if kind == "int":
        grid = int_grid.IntGrid(
            bits=int(spec["bits"]),
            group_size=int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]),
            scale_dtype=DTYPES[spec.get("scale_dtype", "float16")],
            min_scale=float(spec.get("min_scale", int_grid.MIN_SCALE)),
        )
        return IntQuantizer(grid)
    if kind == "ggml":
        return GgmlQuantizer(get_ggml_type(spec["type"]), bool(spec.get("importance", True)))
    raise ValueError(f"unknown quantizer spec {spec!r} (kinds: int, ggml)")
