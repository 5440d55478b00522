"""``quant.format: int``: one grouped integer grid for every linear (the safetensors formats)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from llmquant.formats.base import PlanContext, QuantFormat, QuantSection
from llmquant.quant.grid import MIN_SCALE, IntGrid
from llmquant.quant.plan import QuantizerPlan
from llmquant.quant.quantizers import IntQuantizer


class IntQuant(QuantSection):
    format: Literal["int"] = "int"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = 128  # -1: one group per output channel
    symmetric: bool = False

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be -1 (per channel) or a positive group size")
        return v


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
        grid = IntGrid(
            bits=quant.bits,
            group_size=quant.group_size,
            symmetric=quant.symmetric,
            **scale_storage(ctx.dtype, {e.kind for e in exports}),
        )
        quantizer = IntQuantizer(grid)
        return QuantizerPlan(quantizer.name, {module: quantizer for module in ctx.targets})
