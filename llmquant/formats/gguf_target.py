"""GGUF mixed precision to a target size: each linear's type chosen from its measured errors.

With ``quant.target_bpw`` (bits per weight of the quantized linears) or ``quant.target_size_mb``
(the whole file, 1 MB = 10^6 bytes), every linear is searched under the type ``gguf_mix`` gives
it, as without a target, and ``quantize_block`` also measures its block output error (relative to
each token's block output, in float32) on the search's token subsample under every candidate
type whose block fits its rows. The pipeline also measures each block's downstream gain (what a
relative error at its output costs in the whole model's KLD, ``calib.downstream``), and
``measured_errors`` multiplies the block's errors by it. After the last block
``allocate_target`` gives each linear the candidate that minimises the summed error within the
byte budget (``quant.allocate``); the export type ``target`` writes those types, the
other tensors (embeddings, output, norms) keeping the mix's rules. The budget counts every byte of
the file: the header, the fixed tensors and each tensor's alignment padding, so the predicted
size is the file's size. Decided after the blocks (the errors are needed), then persisted in the
manifest like every export plan; the errors are saved in the block files, so ``--resume`` with
another target reallocates without block work (the target is not in the fingerprint).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llmquant.errors import InputError
from llmquant.export.gguf.mixes import block_size
from llmquant.export.gguf.writer import TensorPlan, aligned_nbytes, header_nbytes
from llmquant.formats.base import PlanContext
from llmquant.quant.allocate import Candidate, allocate, budget_from_bpw
from llmquant.quant.ggml import GGML_TYPES

log = logging.getLogger(__name__)

TARGET = "target"
MB = 1_000_000
# Every GGML type llmquant writes between 3 and 8.5 bits; each linear gets those that fit it.
DEFAULT_CANDIDATES = ["Q3_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1",
                      "Q5_K", "Q6_K", "Q8_0"]  # fmt: skip


def target_key(quant) -> str | None:
    """``quant.target_bpw`` or ``quant.target_size_mb``, whichever is set (None: no target)."""
    if getattr(quant, "target_bpw", None) is not None:
        return "quant.target_bpw"
    if getattr(quant, "target_size_mb", None) is not None:
        return "quant.target_size_mb"
    return None


def linear_candidates(quant, ctx: PlanContext) -> dict[str, list[str]]:
    """Module path -> the candidate types whose block size divides its rows."""
    names = []
    for k, name in enumerate(quant.candidates):
        if name.upper() not in GGML_TYPES or GGML_TYPES[name.upper()].block_size == 1:
            quantized = [t for t, g in GGML_TYPES.items() if g.block_size > 1]
            raise InputError(
                f"quant.candidates[{k}]: {name!r} is not a quantized GGML type llmquant writes "
                f"({', '.join(quantized)})"
            )
        names.append(name.upper())
    widths = sorted({shape[1] for shape in ctx.targets.values()})
    for k, name in enumerate(names):
        if not any(w % block_size(name) == 0 for w in widths):
            raise InputError(
                f"quant.candidates[{k}]: {name} (blocks of {block_size(name)}) fits no linear's "
                f"rows (widths {', '.join(map(str, widths))})"
            )
    fits = {}
    for module, (_, width) in ctx.targets.items():
        fits[module] = [t for t in dict.fromkeys(names) if width % block_size(t) == 0]
        if not fits[module]:
            raise InputError(
                f"{module}: no type in quant.candidates fits its rows of {width}; add one whose "
                f"block divides {width}"
            )
    return fits


@dataclass
class TargetLayout:
    """What the byte budget of the linears is made of, for one GGUF file."""

    gguf_of: dict[str, str]  # module path -> GGUF tensor name
    shapes: dict[str, tuple[int, ...]]  # GGUF name -> shape
    fixed_bytes: int  # header + every tensor that is not an allocated linear, padded
    candidates: dict[str, list[str]]  # module path -> fitting candidate types

    def options(self, errors: dict[str, dict[str, float]]) -> dict[str, list[Candidate]]:
        return {
            module: [
                Candidate(t, aligned_nbytes(self.shapes[g], t), errors[module][t])
                for t in self.candidates[module]
            ]
            for module, g in self.gguf_of.items()
        }

    def budget(self, quant) -> int:
        """Bytes the allocated linears may take; InputError naming the key and feasible range."""
        sizes = [[aligned_nbytes(self.shapes[g], t) for t in self.candidates[m]]
                 for m, g in self.gguf_of.items()]  # fmt: skip
        low, high = sum(map(min, sizes)), sum(map(max, sizes))
        key = target_key(quant)
        n_weights = {m: math.prod(self.shapes[g]) for m, g in self.gguf_of.items()}
        total = sum(n_weights.values())
        if key == "quant.target_bpw":
            budget = budget_from_bpw(n_weights, quant.target_bpw)
            shown = (f"{8 * low / total:.3f} to {8 * high / total:.3f} bits per weight of the "
                     "quantized linears")  # fmt: skip
        else:
            budget = int(quant.target_size_mb * MB) - self.fixed_bytes
            shown = (f"{(low + self.fixed_bytes) / MB:.3f} to {(high + self.fixed_bytes) / MB:.3f}"
                     " MB for the whole file")  # fmt: skip
        if not low <= budget <= high:
            raise InputError(
                f"{key}: {getattr(quant, key.split('.')[1])} is outside what quant.candidates "
                f"can make of this model: {shown}"
            )
        return budget


def target_layout(
    quant, ctx: PlanContext, base: TensorPlan, source_dir: Path, ftype: str
) -> TargetLayout:
    """The layout of the ``target`` file, checked against the target before any block."""
    candidates = linear_candidates(quant, ctx)
    gguf_of = {}
    for gname, hf_name in base.hf_of.items():
        module = hf_name.removesuffix(".weight")
        if hf_name.endswith(".weight") and module in candidates:
            gguf_of[module] = gname
    missing = sorted(set(candidates) - set(gguf_of))
    if missing:
        raise InputError(f"{missing[0]}: no GGUF tensor for it in mix {ftype}")
    allocated = set(gguf_of.values())
    fixed = header_nbytes(source_dir, base, ftype) + sum(
        aligned_nbytes(shape, base.types[g]) for g, shape in base.shapes.items()
        if g not in allocated
    )  # fmt: skip
    layout = TargetLayout(gguf_of, dict(base.shapes), fixed, candidates)
    layout.budget(quant)
    return layout


def allocate_target(
    quant, layout: TargetLayout, base_types: dict[str, str], errors: dict[str, dict[str, float]]
) -> tuple[dict[str, str], dict]:
    """(GGUF name -> type of every tensor of the target file, the report's ``allocation``)."""
    missing = sorted(m for m in layout.gguf_of if m not in errors)
    if missing:
        raise RuntimeError(f"{missing[0]}: no measured candidate errors in its block result")
    budget = layout.budget(quant)
    result = allocate(layout.options(errors), budget)
    types = dict(base_types)
    for module, choice in result.choices.items():
        types[layout.gguf_of[module]] = choice.name
    n_weights = sum(math.prod(layout.shapes[g]) for g in layout.gguf_of.values())
    report = {
        "target": {target_key(quant): getattr(quant, target_key(quant).split(".")[1])},
        "budget_linears_bytes": budget,
        "linears_bytes": result.total_bytes,
        "linears_bpw": round(8 * result.total_bytes / n_weights, 4),
        "predicted_bytes": layout.fixed_bytes + result.total_bytes,
        "binding": result.binding,
        "total_error": result.total_error,
        "counts": dict(sorted(Counter(c.name for c in result.choices.values()).items())),
        "types": {layout.gguf_of[m]: c.name for m, c in sorted(result.choices.items())},
    }
    log.info(
        "allocated %d linears to %s: %d bytes for the linears (%.3f bpw), file %d bytes",
        len(result.choices), report["counts"], result.total_bytes, report["linears_bpw"],
        report["predicted_bytes"],
    )  # fmt: skip
    return types, report
