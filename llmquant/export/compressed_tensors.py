"""compressed-tensors ``pack-quantized`` checkpoints: packing, writer and reader.

Per quantized linear: ``weight_packed`` int32 [out, ceil(in * bits / 32)], ``weight_scale``
[out, n_groups] in the model's dtype, ``weight_zero_point`` int32 [ceil(out * bits / 32),
n_groups] (asymmetric only, packed along the output dimension) and ``weight_shape`` int64 [2]
(the library writes ``torch.tensor(weight.shape)``, and its loader builds the same parameter).

The library quantizes to signed codes ``q_s`` in [-2^(b-1), 2^(b-1) - 1] with a signed zero
point, and packs ``q_s + 2^(b-1)`` sequentially (element ``j`` at bit ``j * b``). Our
asymmetric codes are unsigned with an unsigned zero, ``q_s = q - 2^(b-1)`` and
``zp_s = z - 2^(b-1)``, so the stored unsigned values are our codes themselves; our symmetric
codes are already signed. ``w = (q_s - zp_s) * s`` is unchanged by the shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from llmquant.dtypes import DTYPES
from llmquant.export import common
from llmquant.quant.grid import GroupedCodes, IntGrid, dequantize
from llmquant.runfolder import RunFolder
from llmquant.tensors import SafetensorsFolder

SUPPORTED_BITS = (4, 8)
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def check_grid(grid: IntGrid, module: str = "") -> None:
    where = f"{module}: " if module else ""
    if grid.bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{where}compressed-tensors pack-quantized is written for bits in {SUPPORTED_BITS}, "
            f"got bits={grid.bits} ({grid.describe()})"
        )


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values [rows, cols] into int32 [rows, ceil(cols*bits/32)].

    Sequential: element ``j`` of a row sits at bit ``j * bits``; the tail is padded with 0.
    """
    if 32 % bits:
        raise ValueError(f"sequential int32 packing here supports bits dividing 32, got {bits}")
    if values.min() < 0 or values.max() >= 2**bits:
        raise ValueError(f"values outside the unsigned {bits}-bit range 0..{2**bits - 1}")
    per_word = 32 // bits
    rows, cols = values.shape
    words = math.ceil(cols / per_word)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64)
    padded[:, :cols] = values.to(torch.int64)
    grouped = padded.reshape(rows, words, per_word)  # [rows, words, per_word]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    packed = (grouped << shifts).sum(dim=-1)  # [rows, words], 0 .. 2^32-1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [rows, words] -> int16 [rows, cols] (unsigned)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"pack-quantized tensors are int32, got {packed.dtype}")
    rows, words = packed.shape
    per_word = 32 // bits
    if words != math.ceil(cols / per_word):
        raise ValueError(f"{words} int32 words per row cannot hold {cols} {bits}-bit values")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    mask = 2**bits - 1
    values = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & mask  # [rows, words, per_word]
    return values.reshape(rows, words * per_word)[:, :cols].to(torch.int16)  # [rows, cols]


def unsigned_codes(codes: GroupedCodes) -> torch.Tensor:
    """The stored (offset) value of every code: q_signed + 2^(b-1)."""
    offset = 2 ** (codes.grid.bits - 1)
    return codes.codes if not codes.grid.symmetric else codes.codes + offset


def pack_linear(
    module: str, codes: GroupedCodes, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    grid = codes.grid
    check_grid(grid, module)
    out_features, in_features = codes.codes.shape
    scales = codes.scales.to(scale_dtype)
    if not torch.equal(scales.float(), codes.scales.float()):
        raise ValueError(
            f"{module}: its scales are not exact in the model dtype {scale_dtype}; quantize "
            f"with IntGrid(scale_dtype={scale_dtype}) for this model"
        )
    tensors = {
        "weight_packed": pack_rows(unsigned_codes(codes), grid.bits),  # [out, words]
        "weight_scale": scales.contiguous(),  # [out, n_groups]
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not grid.symmetric:
        assert codes.zeros is not None
        # Packed along dim 0 (output channels), as the library's pack_to_int32(packed_dim=0).
        tensors["weight_zero_point"] = pack_rows(codes.zeros.T, grid.bits).T.contiguous()
    return tensors


def unpack_linear(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: torch.Tensor,
    zero_point: torch.Tensor | None,
    grid: IntGrid,
) -> GroupedCodes:
    """Grouped codes in our convention from the stored tensors of one linear."""
    out_features, in_features = (int(v) for v in shape.tolist())
    offset = 2 ** (grid.bits - 1)
    stored = unpack_rows(packed, grid.bits, in_features)  # [out, in], unsigned
    zeros = None
    if not grid.symmetric:
        if zero_point is None:
            raise ValueError("asymmetric pack-quantized linear without weight_zero_point")
        zeros = unpack_rows(zero_point.T.contiguous(), grid.bits, out_features).T.contiguous()
    return GroupedCodes(
        codes=stored if not grid.symmetric else stored - offset,
        scales=scale.float(),
        zeros=zeros,
        grid=grid,
    )


def _weights_args(grid: IntGrid) -> dict:
    return {
        "num_bits": grid.bits,
        "type": "int",
        "symmetric": grid.symmetric,
        "strategy": "channel" if grid.group_size == -1 else "group",
        "group_size": None if grid.group_size == -1 else grid.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(run: RunFolder, grids: Mapping[str, IntGrid] | None = None) -> dict:
    """config.json's ``quantization_config``: one config group per grid of the run's plan, or
    of ``grids`` (module path -> grid, a size target's allocation) where it names a linear."""
    packed = common.packed_grids(run, grids)
    grids = sorted(set(packed.values()), key=lambda g: (g.bits, g.group_size, g.symmetric))
    if not grids:
        raise ValueError("no quantized linear in the run: nothing to write as compressed-tensors")
    groups: dict[str, dict] = {}
    for k, grid in enumerate(grids):
        if len(grids) == 1:
            targets = ["Linear"]
        else:  # mixed grids: each group names its modules exactly
            targets = sorted(m for m, g in packed.items() if g == grid)
        groups[f"group_{k}"] = {
            "targets": targets,
            "weights": _weights_args(grid),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": common.float_linears(run),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def write_compressed_tensors(
    run: RunFolder,
    out_dir: Path,
    max_shard_bytes: int = common.DEFAULT_MAX_SHARD_BYTES,
    grids: Mapping[str, IntGrid] | None = None,
) -> Path:
    """Write ``run`` as a compressed-tensors ``pack-quantized`` folder; returns ``out_dir``.

    Scales are stored in the model's dtype (the loader builds ``weight_scale`` in it); every
    other float tensor too. ``grids`` (a size target's allocation) re-quantizes each linear it
    names on another grid than its saved codes' from the block file's transformed weight.
    """
    dtype = DTYPES[run.dtype]

    def pack(module: str, codes: GroupedCodes) -> dict[str, torch.Tensor]:
        return pack_linear(module, codes, dtype)

    config = quantization_config(run, grids)
    return common.write_quantized_folder(run, out_dir, pack, config, max_shard_bytes, grids=grids)


def grid_by_module(config: dict) -> tuple[dict[str, IntGrid], IntGrid | None]:
    """Exactly-named module grids and the grid of the class-wide ("Linear") group, if any."""
    named: dict[str, IntGrid] = {}
    default: IntGrid | None = None
    for group_name, group in config.get("config_groups", {}).items():
        weights = group.get("weights") or {}
        if weights.get("type", "int") != "int" or weights.get("actorder"):
            raise ValueError(f"config group {group_name}: only int weights without actorder")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise ValueError(f"config group {group_name}: strategy {strategy!r} not readable")
        grid = IntGrid(
            bits=int(weights["num_bits"]),
            group_size=-1 if strategy == "channel" else int(weights["group_size"]),
            symmetric=bool(weights.get("symmetric", True)),
        )
        for target in group["targets"]:
            if target == "Linear":
                default = grid
            elif target.startswith("re:"):
                raise ValueError(f"config group {group_name}: regex targets are not readable")
            else:
                named[target] = grid
    return named, default


def check_readable(path: Path, config: dict) -> None:
    """ValueError unless ``config`` (quantization_config) is compressed-tensors pack-quantized."""
    if config.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}/config.json: not a compressed-tensors checkpoint")
    if config.get("format") != "pack-quantized":
        raise ValueError(
            f"{path}/config.json: format {config.get('format')!r}, expected pack-quantized"
        )


def weight_unpacker(path: Path, config: dict) -> Callable[[SafetensorsFolder, str], torch.Tensor]:
    """``unpack(folder, module)`` -> float32 weight [out, in], for the grids ``config`` names."""
    named, default = grid_by_module(config)

    def unpack(folder: SafetensorsFolder, module: str) -> torch.Tensor:
        grid = named.get(module, default)
        if grid is None:
            raise ValueError(f"{path}: {module} is packed but no config group targets it")
        zp_name = f"{module}.weight_zero_point"
        codes = unpack_linear(
            folder.require(f"{module}.weight_packed"),
            folder.require(f"{module}.weight_scale"),
            folder.require(f"{module}.weight_shape"),
            folder.get(zp_name) if zp_name in folder else None,
            grid,
        )
        return dequantize(codes)

    return unpack
