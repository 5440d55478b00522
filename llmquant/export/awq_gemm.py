"""AutoAWQ "GEMM" checkpoints: packing, writer and reader.

Per quantized linear (layout transposed against ``nn.Linear.weight`` [out, in]):
``qweight`` int32 [in, out/8], ``qzeros`` int32 [in/group, out/8], ``scales`` float16
[in/group, out]; 8 nibbles per int32 along the output dimension, nibble ``i`` holding output
column ``8c + AWQ_ORDER[i]``. Codes and zeros are unsigned 0..15, ``w = (q - z) * s``; this is
exactly our asymmetric IntGrid, so packing is lossless. Only 4-bit with a zero point exists
in this format (AutoAWQ's GEMM kernels); anything else belongs in compressed-tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmquant.dtypes import DTYPES
from llmquant.export import common
from llmquant.quant.grid import GroupedCodes, IntGrid, dequantize
from llmquant.runfolder import RunFolder
from llmquant.tensors import SafetensorsFolder

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its 8
NIBBLES = 8
PACKED_SUFFIXES = ("qweight", "qzeros", "scales")
# The group sizes AutoAWQ GEMM checkpoints are read with: GPTQModel 7.7's AWQ GEMM and torch
# kernels (``SUPPORTS_GROUP_SIZE``; vLLM's awq_marlin takes the same less 16). -1: per channel.
GROUP_SIZES = (-1, 16, 32, 64, 128)


def check_grid(grid: IntGrid, module: str = "") -> None:
    """Raise ValueError unless ``grid`` is what AutoAWQ GEMM stores (int4 with zero point)."""
    where = f"{module}: " if module else ""
    if grid.bits != 4:
        raise ValueError(
            f"{where}AutoAWQ GEMM stores 4-bit weights only, got bits={grid.bits} "
            f"({grid.describe()}); write compressed-tensors (pack-quantized) instead"
        )
    if grid.symmetric:
        raise ValueError(
            f"{where}AutoAWQ GEMM needs a zero point (symmetric=False), got symmetric=True "
            f"({grid.describe()}); write compressed-tensors (pack-quantized) instead"
        )
    if grid.group_size not in GROUP_SIZES:
        raise ValueError(
            f"{where}AutoAWQ GEMM kernels read group sizes {GROUP_SIZES}, got "
            f"group_size={grid.group_size} ({grid.describe()}); write compressed-tensors instead"
        )


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values [rows, cols] into int32 [rows, cols/8] in AWQ nibble order."""
    rows, cols = values.shape
    if cols % NIBBLES:
        raise ValueError(f"AutoAWQ packs 8 columns per int32; {cols} columns is not a multiple")
    if values.min() < 0 or values.max() > 15:
        raise ValueError("AutoAWQ packs unsigned 4-bit values (0..15)")
    groups = values.to(torch.int64).reshape(rows, cols // NIBBLES, NIBBLES)  # [rows, cols/8, 8]
    ordered = groups[:, :, list(AWQ_ORDER)]  # nibble i <- column AWQ_ORDER[i]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (ordered << shifts).sum(dim=-1)  # [rows, cols/8], 0 .. 2^32-1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 [rows, cols/8] -> int16 [rows, cols] (0..15)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"AutoAWQ packed tensors are int32, got {packed.dtype}")
    rows, words = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [rows, words, 8]
    columns = torch.empty_like(nibbles)
    columns[:, :, list(AWQ_ORDER)] = nibbles  # column AWQ_ORDER[i] <- nibble i
    return columns.reshape(rows, words * NIBBLES).to(torch.int16)  # [rows, cols]


def pack_linear(module: str, codes: GroupedCodes) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros`` and ``scales`` of one linear from its grouped codes."""
    check_grid(codes.grid, module)
    out_features, in_features = codes.codes.shape
    if out_features % NIBBLES:
        raise ValueError(
            f"{module}: AutoAWQ GEMM needs out_features divisible by 8, got {out_features}"
        )
    assert codes.zeros is not None  # asymmetric grid
    scales = codes.scales.T.to(torch.float16).contiguous()  # [n_groups, out]
    if not torch.equal(scales.float(), codes.scales.T.float()):
        raise ValueError(
            f"{module}: AutoAWQ stores float16 scales and these are not exact in float16; "
            "quantize with IntGrid(scale_dtype=torch.float16)"
        )
    return {
        "qweight": pack_columns(codes.codes.T),  # [in, out/8]
        "qzeros": pack_columns(codes.zeros.T),  # [n_groups, out/8]
        "scales": scales,
    }


def unpack_linear(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> GroupedCodes:
    """Grouped codes (our [out, in] orientation) from the three AutoAWQ tensors."""
    in_features = qweight.shape[0]
    n_groups = scales.shape[0]
    if in_features % n_groups:
        raise ValueError(f"scales has {n_groups} groups, which does not divide {in_features} rows")
    group_size = in_features // n_groups
    return GroupedCodes(
        codes=unpack_columns(qweight).T.contiguous(),  # [out, in]
        scales=scales.float().T.contiguous(),  # [out, n_groups]
        zeros=unpack_columns(qzeros).T.contiguous(),  # [out, n_groups]
        grid=IntGrid(bits=4, group_size=group_size, symmetric=False),
    )


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Float32 weight [out, in] = (q - z) * s, computed exactly (AutoAWQ's kernels compute the
    same product in float16)."""
    return dequantize(unpack_linear(qweight, qzeros, scales))


def quantization_config(run: RunFolder) -> dict:
    """config.json's ``quantization_config`` for the run's plan (one int4 asymmetric grid)."""
    grids = set(common.packed_grids(run).values())
    if not grids:
        raise ValueError("no quantized linear in the run: nothing to write as AutoAWQ")
    for grid in grids:
        check_grid(grid)
    group_sizes = {g.group_size for g in grids}
    if len(group_sizes) > 1:
        raise ValueError(
            f"AutoAWQ GEMM has one group_size per model, the run uses {sorted(group_sizes)}; "
            "write compressed-tensors (one config group per grid) instead"
        )
    # -1 (per channel) is AutoAWQ's own spelling of "one group spanning in_features".
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_sizes.pop(),
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": common.float_linears(run) or None,
    }


def write_awq_gemm(
    run: RunFolder, out_dir: Path, max_shard_bytes: int = common.DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write ``run`` as an AutoAWQ GEMM checkpoint folder; returns ``out_dir``.

    Biases of packed linears are stored in float16 like AutoAWQ's WQLinear_GEMM buffers; every
    other float tensor in the source model's dtype.
    """
    packed = common.packed_grids(run)
    dtype = DTYPES[run.dtype]

    def float_dtype(name: str) -> torch.dtype:
        if name.endswith(".bias") and name.removesuffix(".bias") in packed:
            return torch.float16
        return dtype

    config = quantization_config(run)
    return common.write_quantized_folder(
        run, out_dir, pack_linear, config, max_shard_bytes, float_dtype
    )


def unpack_weight(folder: SafetensorsFolder, module: str) -> torch.Tensor:
    """Float32 weight [out, in] of one packed linear of an AutoAWQ GEMM folder."""
    return dequantize_awq(
        folder.require(f"{module}.qweight"),
        folder.require(f"{module}.qzeros"),
        folder.require(f"{module}.scales"),
    )


def check_readable(path: Path, config: dict) -> None:
    """ValueError unless ``config`` (quantization_config) is AutoAWQ GEMM int4 with zero point."""
    # AutoAWQ writes no version for GEMM (its default); detection reads it the same way.
    if config.get("quant_method") != "awq" or str(config.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"{path}/config.json: not an AutoAWQ GEMM checkpoint ({config})")
    if config.get("bits", config.get("w_bit")) != 4 or not config.get("zero_point", True):
        raise ValueError(f"{path}/config.json: only 4-bit AWQ with zero point is readable")
