"""Everything decided before the first block: which linears are quantized and how, what each
export will write and persist, what a run's results depend on (the resume fingerprint), which
passes the block loop needs, and how much an export holds in memory. Any InputError here comes
before expensive work."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmquant import formats
from llmquant.cache import content_digest, file_identity
from llmquant.errors import InputError
from llmquant.formats import OutputFormat, PlanContext
from llmquant.model.stream import StreamedModel
from llmquant.quant.plan import QuantizerPlan, is_ignored
from llmquant.recipe import Recipe

# Names in --out that belong to the run itself; an export may not take them.
RESERVED_NAMES = {"blocks", "report.json", "report.md"}

@dataclass
class PlannedExport:
    name: str
    fmt: OutputFormat
    section: object
    plan: dict  # what the format persists in the run folder for its writer


def target_linears(streamed: StreamedModel, ignore: list[str]) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every block linear that is quantized (not ignored)."""
    targets = {}
    for i, block in enumerate(streamed.layers):
        prefix = streamed.block_prefix(i)
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and not is_ignored(prefix + name, ignore):
                targets[prefix + name] = (module.out_features, module.in_features)
    return targets


def make_plan(recipe: Recipe, ctx: PlanContext) -> QuantizerPlan:
    """The recipe's format decides each linear's quantizer; InputError if one does not fit."""
    plan = formats.quant_format(recipe.quant.format).plan(recipe.quant, recipe.export, ctx)
    try:
        plan.check_widths({m: shape[1] for m, shape in ctx.targets.items()})
    except ValueError as err:
        raise InputError(str(err)) from None
    return plan


def plan_exports(recipe: Recipe, plan: QuantizerPlan, ctx: PlanContext) -> list[PlannedExport]:
    """Every export checked against the recipe and the plan, with the plan it persists."""
    planned: list[PlannedExport] = []
    taken: dict[str, str] = {}  # name in --out -> the export that writes it
    for k, section in enumerate(recipe.export):
        where = f"export[{k}]"
        name = section.name or section.kind
        if "/" in name or name in ("", ".", "..") or name in RESERVED_NAMES:
            raise InputError(
                f"{where}.name {name!r}: must be a plain folder name other than "
                f"{', '.join(sorted(RESERVED_NAMES))}"
            )
        if any(p.name == name for p in planned):
            raise InputError(f"{where}.name {name!r}: another export has this name already")
        fmt = formats.output_format(section.kind)
        fmt.check(where, section, recipe.quant, plan, ctx)
        for written in fmt.written_names(section, name, recipe.name):
            if written in RESERVED_NAMES:
                raise InputError(f"{where}: would write {written!r}, which the run itself writes")
            if written in taken:
                raise InputError(
                    f"{where}: would write {written!r} in --out, as {taken[written]} does; "
                    "give one of them another type or name"
                )
            taken[written] = where
        export_plan = fmt.export_plan(section, recipe.quant, plan, ctx)
        planned.append(PlannedExport(name, fmt, section, export_plan))
    return planned


def text_digest(recipe: Recipe) -> str | None:
    """The bytes of a local ``data.source`` (file or folder), hashed; None for the packaged
    default or a hub dataset (keyed by name)."""
    local = Path(recipe.data.source).expanduser()
    return content_digest(local) if local.exists() else None


def _model_files(model_dir: Path) -> list:
    """(name, size, mtime) of the files block results depend on: weights, configs, tokenizer
    (a README edited beside them is not another model)."""
    return [
        entry for entry in file_identity(model_dir)
        if entry[0].endswith((".safetensors", ".json")) or Path(entry[0]).name.startswith(
            "tokenizer")
    ]  # fmt: skip


# What each fingerprint part is called in a refusal: the keys a user would change.
FINGERPRINT_PARTS = {
    "model": "model.source",
    "model_files": "the model's weight, config or tokenizer files",
    "text": "the calibration text's content (data.source)",
    "dtype": "model.dtype",
    "calibration_batch": "evaluation.batch_size (the calibration batches)",
    "compute_dtype": "runtime.compute_dtype",
    "quant": "quant",
    "awq": "awq",
    "calibration": "calibration",
    "data": "data",
}


# What a size target's block files hold as candidate errors (calib.block._measure_candidates);
# changed with the measure, so --resume never mixes two measures in one allocation.
CANDIDATE_ERROR_MEASURE = "block output error relative to each token's output (since 08b021e)"


def fingerprint_parts(recipe: Recipe, model_dir: Path, compute_dtype: torch.dtype) -> dict:
    """A short hash of each thing that changes block results (keys of FINGERPRINT_PARTS)."""
    doc = {
        "model": str(model_dir),
        # The checkpoint's files (size, mtime): a replaced model at the same path is another run.
        "model_files": _model_files(model_dir),
        # The calibration text's bytes: an edited file at the same path is another run.
        "text": text_digest(recipe),
        "dtype": recipe.model.dtype,
        # The calibration windows are run in batches of this size: it changes every statistic.
        "calibration_batch": recipe.evaluation.batch_size,
        "compute_dtype": str(compute_dtype),
        # A size target only changes which measured candidate a file gets, not a block result:
        # --resume with another target reallocates without block work. Which error the blocks
        # measured is part of it: a folder whose errors are another measure is not resumed.
        "quant": {
            **recipe.quant.model_dump(),
            **{k: CANDIDATE_ERROR_MEASURE for k in ("target_bpw", "target_size_mb")
               if getattr(recipe.quant, k, None) is not None},
        },  # fmt: skip
        "awq": recipe.awq.model_dump(),
        "calibration": recipe.calibration.model_dump(),
        "data": recipe.data.model_dump(),
    }
    return {k: _short_hash(v) for k, v in doc.items()}


def fingerprint(parts: dict) -> str:
    """Hash of what changes block results (resume refuses a folder made by another recipe)."""
    return _short_hash(parts)


def _short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def measured_candidates(recipe: Recipe, ctx: PlanContext) -> dict:
    """Module path -> quantizers whose errors each block measures (a size target's)."""
    fmt = formats.quant_format(recipe.quant.format)
    return fmt.measured_candidates(recipe.quant, recipe.export, ctx)


def calibration_needed(
    recipe: Recipe, plan: QuantizerPlan, exports: list[PlannedExport], measured: dict
) -> bool:
    """Whether anything reads the calibration stream: the searches, a quantizer fitted with
    importance, a writer of importance or a measurement of candidates (round-to-nearest int4
    reads nothing)."""
    return (
        recipe.awq.enabled
        or bool(measured)
        or any(q.needs_importance for q in plan.quantizers.values())
        or any(e.fmt.needs_statistics(e.section, e.plan) for e in exports)
    )

def writer_buffer_bytes(streamed: StreamedModel, dtype: torch.dtype, exports) -> int:
    """The most an export holds in memory at once: a safetensors shard (at most the model's
    size in ``dtype``), or one GGUF tensor in float32 with its encoded bytes (0: no export)."""
    largest = max((p.numel() for p in streamed.model.parameters()), default=0)
    total = streamed.block_numel() * streamed.n_blocks + streamed.non_block_numel()
    size = torch.empty((), dtype=dtype).element_size()
    buffers = [0]
    for export in exports:
        shard = getattr(export.section, "max_shard_gb", None)
        if shard is not None:
            buffers.append(min(int(shard * 2**30), total * size))
        else:
            buffers.append(8 * largest)
    return max(buffers)
