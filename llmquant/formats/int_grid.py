"""``quant.format: int``: one grouped integer grid for every linear (the safetensors formats)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from llmquant.errors import InputError
from llmquant.formats import int_target
from llmquant.formats.base import PlanContext, QuantFormat, QuantSection
from llmquant.quant.grid import MIN_SCALE, IntGrid
from llmquant.quant.plan import QuantizerPlan
from llmquant.quant.quantizers import IntQuantizer
from llmquant.schema import Strict

# The export that writes an allocation: it holds one config group per grid.
TARGET_EXPORT = "compressed-tensors"


def _check_group(v: int) -> int:
    if v != -1 and v < 1:
        raise ValueError("must be -1 (per channel) or a positive group size")
    return v


class IntCandidate(Strict):
    """One grid a size target may give a linear (symmetry is the recipe's ``symmetric``)."""

    bits: int = Field(ge=2, le=8)
    group_size: int  # -1: one group per output channel

    _group = field_validator("group_size")(_check_group)


class IntQuant(QuantSection):
    format: Literal["int"] = "int"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = 128  # -1: one group per output channel
    symmetric: bool = False
    # Mixed precision (formats/int_target.py): the compressed-tensors export gets per-linear
    # grids from ``candidates``, chosen by measured error to meet this many bits per weight.
    target_bpw: float | None = Field(None, gt=0)
    candidates: list[IntCandidate] = Field(
        default_factory=lambda: [IntCandidate(**c) for c in int_target.DEFAULT_CANDIDATES],
        min_length=1,
    )

    _group = field_validator("group_size")(_check_group)


def scale_storage(model_dtype: torch.dtype, export_kinds: set[str]) -> dict:
    """The scale dtype (and smallest scale) that every export stores exactly: AutoAWQ GEMM
    stores float16 scales, compressed-tensors the model's dtype. A bfloat16 model exported to
    both gets bfloat16 scales of at least 2^-14, which float16 holds exactly too."""
    if model_dtype == torch.bfloat16 and "compressed-tensors" in export_kinds:
        both = "awq-gemm" in export_kinds
        return {"scale_dtype": torch.bfloat16, "min_scale": 2.0**-14 if both else MIN_SCALE}
    return {"scale_dtype": torch.float16, "min_scale": MIN_SCALE}


class IntGridFormat(QuantFormat):
    name = "int"
    section = IntQuant

    def plan(self, quant: IntQuant, exports: list, ctx: PlanContext) -> QuantizerPlan:
        storage = scale_storage(ctx.dtype, {e.kind for e in exports})
        if int_target.has_target(quant):
            if not any(e.kind == TARGET_EXPORT for e in exports):
                raise InputError(
                    f"{int_target.KEY}: no {TARGET_EXPORT} export, so nothing would write the "
                    f"allocated grids; add export: [{{kind: {TARGET_EXPORT}}}]"
                )
            # The candidates' names and widths before any export check or block.
            int_target.candidate_grids(quant, ctx, storage)
        grid = IntGrid(
            bits=quant.bits, group_size=quant.group_size, symmetric=quant.symmetric, **storage
        )
        quantizer = IntQuantizer(grid)
        return QuantizerPlan(quantizer.name, {module: quantizer for module in ctx.targets})

    def measured_candidates(
        self, quant: IntQuant, exports: list, ctx: PlanContext
    ) -> dict[str, list[IntQuantizer]]:
        """With a target: module path -> every candidate grid that fits it, with the scale
        storage of the searched grid (so the searched grid is one of them when listed)."""
        if not int_target.has_target(quant):
            return {}
        storage = scale_storage(ctx.dtype, {e.kind for e in exports})
        made: dict[IntGrid, IntQuantizer] = {}
        return {
            module: [made.setdefault(g, IntQuantizer(g)) for g in grids]
            for module, grids in int_target.candidate_grids(quant, ctx, storage).items()
        }
