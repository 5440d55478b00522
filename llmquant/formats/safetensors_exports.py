"""The two packed safetensors exports: AutoAWQ GEMM and compressed-tensors ``pack-quantized``.

Both pack the integer codes of an ``int`` run unchanged (``llmquant.export``); each checks
before the first block that the plan's grids are ones it can store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from llmquant.errors import InputError
from llmquant.export import awq_gemm, compressed_tensors
from llmquant.formats import int_target
from llmquant.formats.base import OutputFormat, PlanContext, measured_errors
from llmquant.formats.int_grid import IntQuant
from llmquant.quant.grid import IntGrid
from llmquant.quant.plan import QuantizerPlan
from llmquant.quant.quantizers import IntQuantizer, quantizer_from_spec
from llmquant.runfolder import RunFolder
from llmquant.schema import Strict
from llmquant.tensors import PackedFolder, TensorSource

# The writer holds one shard in memory until it is written: the shard size bounds its memory.
SHARD_GB = 2.0


class AwqGemmExport(Strict):
    kind: Literal["awq-gemm"]
    name: str | None = None
    max_shard_gb: float = Field(SHARD_GB, gt=0)


class CompressedTensorsExport(Strict):
    kind: Literal["compressed-tensors"]
    name: str | None = None
    max_shard_gb: float = Field(SHARD_GB, gt=0)


def _searched_storage(plan: QuantizerPlan) -> dict:
    """The scale storage of an int run's one searched grid, which its candidates share (so a
    linear allocated the searched grid keeps its saved codes)."""
    (grid,) = {q.grid for q in plan.quantizers.values()}
    return {"scale_dtype": grid.scale_dtype, "min_scale": grid.min_scale}


class PackedSafetensors(OutputFormat):
    """What the two share: a plan of integer grids, each linear checked, one folder written."""

    def check(self, where: str, section, quant, plan: QuantizerPlan, ctx: PlanContext) -> None:
        if not all(q.produces_codes for q in plan.quantizers.values()):
            raise InputError(
                f"{where}: {self.kind} packs integer codes; this run quantizes with {plan.name} "
                "(set quant.format: int, or export gguf instead)"
            )
        if isinstance(quant, IntQuant):
            # The recipe's own keys first: they are what the user edits.
            try:
                self.check_quant(quant)
            except ValueError as err:
                raise InputError(f"{where} ({self.kind}): {err}") from None
        for module, quantizer in plan.quantizers.items():
            try:
                self.check_linear(module, quantizer.grid, ctx.targets[module])
            except ValueError as err:
                raise InputError(f"{where}: {err}") from None

    def check_quant(self, quant: IntQuant) -> None:
        """ValueError naming the ``quant`` key this format cannot store."""

    def check_linear(self, module: str, grid: IntGrid, shape: tuple[int, int]) -> None:
        """ValueError naming ``module`` when this format cannot store it."""

    def write_folder(
        self, run: RunFolder, out_dir: Path, max_shard_bytes: int, export_plan: dict
    ) -> Path:
        raise NotImplementedError

    def write(self, run: RunFolder, name: str, section, out_dir: Path, model_name: str) -> dict:
        path = self.write_folder(
            run, out_dir / name, int(section.max_shard_gb * 2**30), run.exports.get(name, {})
        )
        return {name: str(path)}


class AwqGemm(PackedSafetensors):
    kind = "awq-gemm"
    section = AwqGemmExport
    quant_method = "awq"

    def check_quant(self, quant: IntQuant) -> None:
        instead = "or write compressed-tensors (pack-quantized) instead"
        if int_target.has_target(quant):
            raise ValueError(
                f"{int_target.KEY} gives the linears several grids; AutoAWQ GEMM holds one "
                "scheme (drop this export, or drop quant.target_bpw)"
            )
        if quant.bits != 4:
            raise ValueError(
                f"quant.bits is {quant.bits}; AutoAWQ GEMM stores 4-bit weights only "
                f"(set quant.bits: 4, {instead})"
            )
        if quant.symmetric:
            raise ValueError(
                "quant.symmetric is true; AutoAWQ GEMM needs a zero point "
                f"(set quant.symmetric: false, {instead})"
            )
        if quant.group_size not in awq_gemm.GROUP_SIZES:
            sizes = ", ".join(map(str, awq_gemm.GROUP_SIZES))
            raise ValueError(
                f"quant.group_size is {quant.group_size}; AutoAWQ GEMM kernels read group "
                f"sizes {sizes} (pick one, {instead})"
            )

    def check_linear(self, module: str, grid: IntGrid, shape: tuple[int, int]) -> None:
        awq_gemm.check_grid(grid, module)
        if shape[0] % awq_gemm.NIBBLES:
            raise ValueError(
                f"{module}: AutoAWQ GEMM needs out_features divisible by 8, got {shape[0]}"
            )

    def write_folder(
        self, run: RunFolder, out_dir: Path, max_shard_bytes: int, export_plan: dict
    ) -> Path:
        return awq_gemm.write_awq_gemm(run, out_dir, max_shard_bytes)

    def detect(self, path: Path, quantization_config: dict) -> bool:
        return (
            quantization_config.get("quant_method") == "awq"
            and str(quantization_config.get("version", "gemm")).lower() == "gemm"
        )

    def open(self, path: Path, quantization_config: dict) -> TensorSource:
        try:
            awq_gemm.check_readable(path, quantization_config)
        except ValueError as err:
            raise InputError(str(err)) from None
        return PackedFolder(path, awq_gemm.PACKED_SUFFIXES, awq_gemm.unpack_weight)


class CompressedTensors(PackedSafetensors):
    kind = "compressed-tensors"
    section = CompressedTensorsExport
    quant_method = "compressed-tensors"

    def check_quant(self, quant: IntQuant) -> None:
        if quant.bits not in compressed_tensors.SUPPORTED_BITS:
            bits = " or ".join(map(str, compressed_tensors.SUPPORTED_BITS))
            raise ValueError(
                f"quant.bits is {quant.bits}; compressed-tensors pack-quantized is written for "
                f"{bits} bits"
            )
        if int_target.has_target(quant):
            for k, candidate in enumerate(quant.candidates):
                if candidate.bits not in compressed_tensors.SUPPORTED_BITS:
                    bits = " or ".join(map(str, compressed_tensors.SUPPORTED_BITS))
                    raise ValueError(
                        f"quant.candidates[{k}]: bits {candidate.bits}; compressed-tensors "
                        f"pack-quantized is written for {bits} bits"
                    )

    def check(self, where: str, section, quant, plan: QuantizerPlan, ctx: PlanContext) -> None:
        super().check(where, section, quant, plan, ctx)
        if isinstance(quant, IntQuant) and int_target.has_target(quant):
            # The target's feasibility, in bits per weight, before any block.
            int_target.target_layout(quant, ctx, _searched_storage(plan))

    def export_plan(self, section, quant, plan: QuantizerPlan, ctx: PlanContext) -> dict:
        if isinstance(quant, IntQuant) and int_target.has_target(quant):
            # Filled after the last block (finish_plan): module path -> allocated grid spec.
            return {"target": {int_target.KEY: quant.target_bpw}, "grids": {}}
        return {}

    def finish_plan(
        self, run: RunFolder, name: str, section, quant, ctx: PlanContext,
        block_info: list[dict],
    ) -> dict | None:  # fmt: skip
        """Each linear's grid: the allocation of the linears' measured errors."""
        if not (isinstance(quant, IntQuant) and int_target.has_target(quant)):
            return None
        layout = int_target.target_layout(quant, ctx, _searched_storage(run.plan))
        grids, report = int_target.allocate_grids(quant, layout, measured_errors(block_info))
        run.exports[name] = {
            "target": {int_target.KEY: quant.target_bpw},
            "grids": {m: IntQuantizer(g).spec() for m, g in grids.items()},
        }
        run.write_manifest()
        return {**report, "output": name}

    def write_folder(
        self, run: RunFolder, out_dir: Path, max_shard_bytes: int, export_plan: dict
    ) -> Path:
        grids = {
            module: quantizer_from_spec(spec).grid
            for module, spec in export_plan.get("grids", {}).items()
        }
        return compressed_tensors.write_compressed_tensors(
            run, out_dir, max_shard_bytes, grids=grids
        )

    def open(self, path: Path, quantization_config: dict) -> TensorSource:
        try:
            compressed_tensors.check_readable(path, quantization_config)
            unpack = compressed_tensors.weight_unpacker(path, quantization_config)
        except ValueError as err:
            raise InputError(str(err)) from None
        return PackedFolder(path, compressed_tensors.PACKED_SUFFIXES, unpack)
