"""Int grids to a target size: each linear's grid chosen from its measured errors.

The int grid's mirror of ``formats/gguf_target.py``. With ``quant.target_bpw`` (bits per weight
of the quantized linears, counting every byte compressed-tensors stores for them: the packed
codes, each group's scale in the model's dtype, the packed zero points and ``weight_shape``),
every linear is searched under the recipe's own grid (``bits``/``group_size``) as without a
target, and ``quantize_block`` also measures its block output error (relative to each
token's block output, times the block's downstream gain: ``calib.downstream``) under every
candidate grid of ``quant.candidates`` that fits its width. After the last block
``allocate_grids`` gives each linear the candidate that minimises the summed error within the
byte budget
(``quant.allocate``); the compressed-tensors export writes one config group per chosen grid,
each linear re-quantized from its block file's transformed float weight under its grid (one
whose grid is the searched one keeps its saved codes). The allocation is persisted in the
manifest's export plan; the target is not in the fingerprint, so ``--resume`` with another
target re-allocates without block work.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping

import torch

from llmquant.errors import InputError
from llmquant.formats.base import PlanContext
from llmquant.quant.allocate import Candidate, allocate, budget_from_bpw
from llmquant.quant.grid import IntGrid

log = logging.getLogger(__name__)

KEY = "quant.target_bpw"
# int4 at two group sizes and int8: the grids vLLM and transformers serve from compressed-tensors.
DEFAULT_CANDIDATES = [
    {"bits": 4, "group_size": 128},
    {"bits": 4, "group_size": 32},
    {"bits": 8, "group_size": 128},
]


def has_target(quant) -> bool:
    return getattr(quant, "target_bpw", None) is not None


def _fits(grid: IntGrid, width: int) -> bool:
    return grid.group_size == -1 or width % grid.group_size == 0


def candidate_grids(quant, ctx: PlanContext, storage: Mapping) -> dict[str, list[IntGrid]]:
    """Module path -> the candidate grids (the recipe's ``symmetric``, the run's scale storage
    ``storage``) whose group size divides its width; InputError naming the candidate that fits
    no linear, or the linear that no candidate fits."""
    grids = [
        IntGrid(bits=c.bits, group_size=c.group_size, symmetric=quant.symmetric, **storage)
        for c in quant.candidates
    ]
    widths = sorted({shape[1] for shape in ctx.targets.values()})
    for k, grid in enumerate(grids):
        if not any(_fits(grid, w) for w in widths):
            raise InputError(
                f"quant.candidates[{k}]: {grid.describe()} fits no linear's width (group size "
                f"{grid.group_size} divides none of {', '.join(map(str, widths))})"
            )
    fits = {}
    for module, (_, width) in ctx.targets.items():
        fits[module] = [g for g in dict.fromkeys(grids) if _fits(g, width)]
        if not fits[module]:
            raise InputError(
                f"{module}: no grid in quant.candidates fits its width of {width}; add one "
                f"whose group size divides {width} (or group_size: -1)"
            )
    return fits


def stored_bytes(grid: IntGrid, shape: tuple[int, int], scale_bytes: int) -> int:
    """Bytes compressed-tensors pack-quantized stores for one linear [out, in] on ``grid``:
    ``weight_packed`` (int32 words per row), ``weight_scale`` (one per group, in the model's
    dtype), ``weight_zero_point`` (int32, packed along the output dimension; asymmetric only)
    and ``weight_shape`` (two int64)."""
    out_f, in_f = shape
    groups = grid.groups_for(in_f)
    per_word = 32 // grid.bits
    total = out_f * math.ceil(in_f / per_word) * 4 + out_f * groups * scale_bytes + 2 * 8
    if not grid.symmetric:
        total += math.ceil(out_f / per_word) * groups * 4
    return total


class IntTargetLayout:
    """The candidates of every allocated linear and what each costs in the export."""

    def __init__(
        self, grids: dict[str, list[IntGrid]], shapes: dict[str, tuple[int, int]],
        dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.grids = grids
        self.shapes = shapes
        self.scale_bytes = torch.empty((), dtype=dtype).element_size()

    def nbytes(self, module: str, grid: IntGrid) -> int:
        return stored_bytes(grid, self.shapes[module], self.scale_bytes)

    def options(self, errors: dict[str, dict[str, float]]) -> dict[str, list[Candidate]]:
        return {
            module: [
                Candidate(g.describe(), self.nbytes(module, g), errors[module][g.describe()])
                for g in grids
            ]
            for module, grids in self.grids.items()
        }

    def n_weights(self) -> dict[str, int]:
        return {m: math.prod(self.shapes[m]) for m in self.grids}

    def budget(self, target_bpw: float) -> int:
        """Bytes the linears may take; InputError naming the key and the feasible range."""
        sizes = [[self.nbytes(m, g) for g in grids] for m, grids in self.grids.items()]
        low, high = sum(map(min, sizes)), sum(map(max, sizes))
        total = sum(self.n_weights().values())
        budget = budget_from_bpw(self.n_weights(), target_bpw)
        if not low <= budget <= high:
            raise InputError(
                f"{KEY}: {target_bpw} is outside what quant.candidates can make of this model: "
                f"{8 * low / total:.3f} to {8 * high / total:.3f} bits per weight of the "
                "quantized linears (as compressed-tensors stores them)"
            )
        return budget


def target_layout(quant, ctx: PlanContext, storage: Mapping) -> IntTargetLayout:
    """The layout, checked against the target before any block."""
    layout = IntTargetLayout(candidate_grids(quant, ctx, storage), dict(ctx.targets), ctx.dtype)
    layout.budget(quant.target_bpw)
    return layout


def allocate_grids(
    quant, layout: IntTargetLayout, errors: dict[str, dict[str, float]]
) -> tuple[dict[str, IntGrid], dict]:
    """(module path -> allocated grid, the report's ``allocation``)."""
    missing = sorted(m for m in layout.grids if m not in errors)
    if missing:
        raise RuntimeError(f"{missing[0]}: no measured candidate errors in its block result")
    budget = layout.budget(quant.target_bpw)
    result = allocate(layout.options(errors), budget)
    by_name = {g.describe(): g for grids in layout.grids.values() for g in grids}
    grids = {module: by_name[choice.name] for module, choice in result.choices.items()}
    n_weights = sum(layout.n_weights().values())
    report = {
        "target": {KEY: quant.target_bpw},
        "budget_linears_bytes": budget,
        "linears_bytes": result.total_bytes,
        "linears_bpw": round(8 * result.total_bytes / n_weights, 4),
        # A folder's other tensors (embeddings, norms) are the source's: the prediction is of
        # the allocated linears' tensors, which the test reads back from the written shards.
        "predicted_bytes": result.total_bytes,
        "binding": result.binding,
        "total_error": result.total_error,
        "counts": dict(sorted(Counter(c.name for c in result.choices.values()).items())),
        "types": {m: c.name for m, c in sorted(result.choices.items())},
    }
    log.info(
        "allocated %d linears to %s: %d bytes for the linears (%.3f bpw)",
        len(grids), report["counts"], result.total_bytes, report["linears_bpw"],
    )  # fmt: skip
    return grids, report
