"""GGUF: ``quant.format: gguf`` (every linear searched under the GGML type llama.cpp's mix gives
its tensor) and the ``gguf`` export (one file per mix, llama.cpp's type choice persisted)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llmquant.errors import InputError
from llmquant.export.gguf.mixes import get_mix
from llmquant.export.gguf.writer import TensorPlan, source_shapes, tensor_plan, write_gguf
from llmquant.formats import gguf_target
from llmquant.formats.base import (
    OutputFormat,
    PlanContext,
    QuantFormat,
    QuantSection,
    measured_errors,
)
from llmquant.quant.ggml import get_ggml_type
from llmquant.quant.plan import QuantizerPlan
from llmquant.quant.quantizers import GgmlQuantizer
from llmquant.runfolder import RunFolder
from llmquant.schema import Strict
from llmquant.tensors import SafetensorsFolder, TensorSource

log = logging.getLogger(__name__)


class GgufQuant(QuantSection):
    # Every linear is searched and quantized with the GGML type that llama.cpp's mix
    # ``gguf_mix`` gives its tensor, with importance-weighted fitting unless the gguf export
    # that writes this mix says ``importance: false``.
    format: Literal["gguf"]
    gguf_mix: str = "Q4_K_M"
    # Mixed precision (formats/gguf_target.py): the export type ``target`` gets per-linear
    # types from ``candidates``, chosen by measured error to meet one of these.
    target_bpw: float | None = Field(None, gt=0)  # bits per weight of the quantized linears
    target_size_mb: float | None = Field(None, gt=0)  # the whole file, 1 MB = 10^6 bytes
    candidates: list[str] = Field(
        default_factory=lambda: list(gguf_target.DEFAULT_CANDIDATES), min_length=1
    )

    @model_validator(mode="after")
    def _one_target(self) -> GgufQuant:
        if self.target_bpw is not None and self.target_size_mb is not None:
            raise ValueError("give quant.target_bpw or quant.target_size_mb, not both")
        return self


class GgufExport(Strict):
    kind: Literal["gguf"]
    name: str | None = None
    types: list[str] = Field(default_factory=lambda: ["Q4_K_M"], min_length=1)
    # Fit blocks with the run's mean x² (llama.cpp's imatrix); false: plain llama.cpp rounding.
    importance: bool = True


def gguf_file_name(model_name: str, ftype: str) -> str:
    return f"{model_name}-{ftype}.gguf"


def _tensor_plan(mix: str, importance: bool, ctx: PlanContext, where: str) -> TensorPlan:
    try:
        return tensor_plan(ctx.config, source_shapes(ctx.source), mix, importance)
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None


def _search_importance(quant: GgufQuant, exports: list) -> bool:
    """Whether the search fits with importance: as the export that writes the searched mix
    (or the target file, whose types are chosen among the searched ones' neighbours)."""
    mix = get_mix(quant.gguf_mix).name
    for export in exports:
        # An unknown type name is the export check's to report, with its key.
        if isinstance(export, GgufExport) and {mix, TARGET} & set(map(str.upper, export.types)):
            return export.importance
    return True


TARGET = gguf_target.TARGET.upper()


def _writes_target(exports: list) -> bool:
    return any(
        isinstance(e, GgufExport) and TARGET in map(str.upper, e.types) for e in exports
    )




class GgufQuantFormat(QuantFormat):
    name = "gguf"
    section = GgufQuant

    def plan(self, quant: GgufQuant, exports: list, ctx: PlanContext) -> QuantizerPlan:
        try:
            mix = get_mix(quant.gguf_mix).name
        except ValueError as err:
            raise InputError(f"quant.gguf_mix: {err}") from None
        key = gguf_target.target_key(quant)
        if key is not None and not _writes_target(exports):
            raise InputError(
                f"{key}: no gguf export lists '{gguf_target.TARGET}' in its types, so nothing "
                "would write the allocated file; add export: [{kind: gguf, types: [target]}]"
            )
        importance = _search_importance(quant, exports)
        planned = _tensor_plan(mix, importance, ctx, "quant.gguf_mix")
        weight_types = {
            planned.hf_of[g].removesuffix(".weight"): t
            for g, t in planned.types.items()
            if planned.hf_of[g].endswith(".weight") and len(planned.shapes[g]) == 2
        }
        made: dict[str, GgmlQuantizer] = {}
        quantizers = {}
        for module in ctx.targets:
            if module not in weight_types:
                raise InputError(f"{module}: no GGUF tensor for it in mix {mix}")
            t = weight_types[module]
            quantizers[module] = made.setdefault(t, GgmlQuantizer(get_ggml_type(t), importance))
        counts = Counter(weight_types.values())
        summary = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        return QuantizerPlan(f"GGUF {mix} ({summary})", quantizers)

    def measured_candidates(
        self, quant: GgufQuant, exports: list, ctx: PlanContext
    ) -> dict[str, list[GgmlQuantizer]]:
        """With a target: module path -> every candidate type that fits it."""
        if gguf_target.target_key(quant) is None:
            return {}
        importance = _search_importance(quant, exports)
        made: dict[str, GgmlQuantizer] = {}
        return {
            module: [made.setdefault(t, GgmlQuantizer(get_ggml_type(t), importance))
                     for t in types]  # fmt: skip
            for module, types in gguf_target.linear_candidates(quant, ctx).items()
        }


class GgufOutput(OutputFormat):
    kind = "gguf"
    section = GgufExport

    def check(
        self, where: str, section: GgufExport, quant, plan: QuantizerPlan, ctx: PlanContext
    ) -> None:
        seen: dict[str, int] = {}
        for k, ftype in enumerate(section.types):
            if ftype.upper() == TARGET:
                self._check_target(f"{where}.types[{k}]", section, quant, ctx)
                seen.setdefault(TARGET, k)
                continue
            try:
                mix = get_mix(ftype).name
            except ValueError as err:
                raise InputError(f"{where}.types[{k}]: {err}") from None
            if mix in seen:
                # Both would be written to the same file name.
                raise InputError(
                    f"{where}.types[{k}]: {ftype!r} is {where}.types[{seen[mix]}] again"
                )
            seen[mix] = k
            _tensor_plan(mix, section.importance, ctx, f"{where}.types[{k}]")
            searched = getattr(quant, "gguf_mix", None)
            if searched is None or get_mix(searched).name != mix:
                # Accepted (a GGUF beside the safetensors of an int run is useful), but said
                # before the first block: these bytes are not what the search optimised.
                log.warning(
                    "%s.types[%d] (gguf %s): its bytes are made by re-quantizing the run's "
                    "transformed weights with llama.cpp's %s types; the search ran under %s. "
                    "For a file searched under its own types set quant.format: gguf and "
                    "quant.gguf_mix: %s",
                    where, k, mix, mix, plan.name, mix,
                )  # fmt: skip

    @staticmethod
    def _check_target(where: str, section: GgufExport, quant, ctx: PlanContext) -> None:
        if gguf_target.target_key(quant) is None:
            raise InputError(
                f"{where}: '{gguf_target.TARGET}' writes types allocated to quant.target_bpw "
                "or quant.target_size_mb (with quant.format: gguf); set one"
            )
        if ctx.source_dir is None:
            raise InputError(f"{where}: a target file needs the model's folder")
        base = _tensor_plan(quant.gguf_mix, section.importance, ctx, where)
        # The target's feasibility, in the key's units, before any block.
        gguf_target.target_layout(quant, ctx, base, ctx.source_dir, quant.gguf_mix)

    def export_plan(
        self, section: GgufExport, quant, plan: QuantizerPlan, ctx: PlanContext
    ) -> dict:
        types: dict[str, dict] = {}
        plan_doc: dict = {"types": types}
        for ftype in section.types:
            if ftype.upper() == TARGET:
                # The mix's types until the allocation after the last block replaces the
                # linears' (gguf_target.allocate_target); the mix names the file type.
                mix = get_mix(quant.gguf_mix).name
                types[gguf_target.TARGET] = _tensor_plan(mix, section.importance, ctx,
                                                         "export").types  # fmt: skip
                plan_doc["target_mix"] = mix
                continue
            mix = get_mix(ftype).name
            types[mix] = _tensor_plan(mix, section.importance, ctx, "export").types
        return plan_doc

    def finish_plan(
        self, run: RunFolder, name: str, section: GgufExport, quant, ctx: PlanContext,
        block_info: list[dict],
    ) -> dict | None:  # fmt: skip
        """The target file's types: the allocation of the linears' measured errors."""
        if TARGET not in map(str.upper, section.types):
            return None
        mix = run.exports[name]["target_mix"]
        base = _tensor_plan(mix, section.importance, ctx, "export")
        layout = gguf_target.target_layout(quant, ctx, base, run.source_dir, mix)
        errors = measured_errors(block_info)
        types, report = gguf_target.allocate_target(quant, layout, base.types, errors)
        run.exports[name]["types"][gguf_target.TARGET] = types
        run.write_manifest()
        (ftype,) = [t for t in section.types if t.upper() == TARGET]
        return {**report, "output": f"{section.name or 'gguf'}-{ftype}"}

    def written_names(self, section: GgufExport, name: str, model_name: str) -> list[str]:
        return [gguf_file_name(model_name, ftype) for ftype in section.types]

    def needs_statistics(self, section: GgufExport, export_plan: dict) -> bool:
        return section.importance and any(
            get_ggml_type(t).uses_importance
            for types in export_plan["types"].values()
            for t in types.values()
        )

    def write(
        self, run: RunFolder, name: str, section: GgufExport, out_dir: Path, model_name: str
    ) -> dict[str, str]:
        """One GGUF file per type of ``section``, all from the same transformed weights."""
        tensors = run.tensors()
        importance = tensors.importance if section.importance else None
        outputs = {}
        for ftype in section.types:
            if ftype.upper() == TARGET:
                mix, key = run.exports[name]["target_mix"], gguf_target.TARGET
            else:
                mix = key = get_mix(ftype).name
            path = out_dir / gguf_file_name(model_name, ftype)
            types = run.exports[name]["types"][key]
            write_gguf(
                run.source_dir, tensors, path, mix, types, importance=importance,
                name=model_name,
            )  # fmt: skip
            outputs[f"{section.name or 'gguf'}-{ftype}"] = str(path)
        return outputs

    def detect(self, path: Path, quantization_config: dict) -> bool:
        if not path.is_file():
            return False
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"

    def open(self, path: Path, quantization_config: dict) -> TensorSource:
        """Dequantized once through transformers into a cached safetensors folder."""
        from llmquant.model.source import resolve_model

        return SafetensorsFolder(resolve_model(str(path)))
