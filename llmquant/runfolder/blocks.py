"""Block result files: one safetensors file per decoder block, the unit ``--resume`` reuses.

A block file holds, under the module's full Hugging Face name:
- every float tensor of the block after the transforms (AWQ scales folded into norms and linears,
  clipping applied), e.g. ``model.layers.3.input_layernorm.weight``;
- for each linear ``P`` with integer codes: ``P.qcodes`` (uint8, code - qmin), ``P.qscales``
  ([out, n_groups], in the grid's scale dtype), ``P.qzeros`` (uint8, asymmetric grids only);
- for each linear with statistics: ``P.act_mean_abs`` and ``P.act_mean_sq`` (float32, [in]).
The file's metadata holds a JSON document with the grid of every coded linear, token counts and
the block's search losses. Files are written to a temporary name, fsync'ed and renamed, so a
block file that exists is whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmquant.cache import publish
from llmquant.dtypes import DTYPES, dtype_name
from llmquant.errors import InputError
from llmquant.quant.grid import MIN_SCALE, GroupedCodes, IntGrid
from llmquant.quant.results import BlockResult, LinearResult
from llmquant.tensors import open_safetensors

# Suffixes of the tensors a block file adds to the model's own (codes and statistics).
RESULT_SUFFIXES = (".qcodes", ".qscales", ".qzeros", ".act_mean_abs", ".act_mean_sq")


def block_file(blocks_dir: Path, index: int) -> Path:
    return Path(blocks_dir) / f"block_{index:04d}.safetensors"


def _grid_to_json(grid: IntGrid) -> dict:
    return {
        "bits": grid.bits,
        "group_size": grid.group_size,
        "symmetric": grid.symmetric,
        "scale_dtype": dtype_name(grid.scale_dtype),
        "min_scale": grid.min_scale,
    }


def _grid_from_json(doc: dict) -> IntGrid:
    return IntGrid(
        bits=doc["bits"],
        group_size=doc["group_size"],
        symmetric=doc["symmetric"],
        scale_dtype=DTYPES[doc.get("scale_dtype", "float16")],
        min_scale=doc.get("min_scale", MIN_SCALE),
    )


def save_block(path: Path, result: BlockResult, fingerprint: str = "") -> None:
    """Write ``result`` to ``path`` atomically (temporary name, fsync, rename), with the
    fingerprint of the run that made it."""
    tensors: dict[str, torch.Tensor] = {
        k: v.detach().contiguous().cpu() for k, v in result.tensors.items()
    }
    linears_meta: dict[str, dict] = {}
    for name, lin in result.linears.items():
        meta: dict = {"n_tokens": lin.n_tokens}
        if lin.codes is not None:
            grid = lin.codes.grid
            meta["grid"] = _grid_to_json(grid)
            tensors[f"{name}.qcodes"] = (lin.codes.codes - grid.qmin).to(torch.uint8).contiguous()
            tensors[f"{name}.qscales"] = lin.codes.scales.to(grid.scale_dtype).contiguous()
            if lin.codes.zeros is not None:
                tensors[f"{name}.qzeros"] = lin.codes.zeros.to(torch.uint8).contiguous()
        if lin.mean_abs is not None:
            tensors[f"{name}.act_mean_abs"] = lin.mean_abs.float().contiguous()
        if lin.mean_sq is not None:
            tensors[f"{name}.act_mean_sq"] = lin.mean_sq.float().contiguous()
        linears_meta[name] = meta
    doc = {
        "index": result.index,
        "fingerprint": fingerprint,
        "linears": linears_meta,
        "info": result.info,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"llmquant": json.dumps(doc)})
    publish(tmp, path)


def block_file_problem(path: Path, fingerprint: str) -> str | None:
    """Why ``path`` is not a complete block file of the run with ``fingerprint`` (None: it is).
    Reads the header only (safetensors checks that it covers the whole file, so a truncated
    file fails here)."""
    try:
        with open_safetensors(path) as f:
            doc = json.loads(f.metadata()["llmquant"])
    except InputError as err:  # its message starts with the path, which the caller names
        return str(err).removeprefix(f"{path}: ")
    except (ValueError, KeyError, TypeError) as err:
        return f"damaged ({type(err).__name__}: {err})"
    if doc.get("fingerprint") != fingerprint:
        return "made by another recipe or model (its fingerprint differs)"
    return None


def block_tensor_names(path: Path) -> list[str]:
    """Names of the model tensors in a block file (its codes and statistics left out)."""
    with open_safetensors(path) as f:
        return [k for k in f.keys() if not k.endswith(RESULT_SUFFIXES)]


def block_tensor_shape(path: Path, name: str) -> tuple[int, ...]:
    with open_safetensors(path) as f:
        return tuple(f.get_slice(name).get_shape())


def load_block(path: Path) -> BlockResult:
    with open_safetensors(path) as f:
        doc = json.loads(f.metadata()["llmquant"])
        # Copied out of the file's mapping: a zero-copy tensor kept anywhere (a norm weight in
        # an export's pending shard) would keep the whole mapped file resident, block after
        # block (the 7B export grew to 9.6 GB RSS that way).
        raw = {k: f.get_tensor(k).clone() for k in f.keys()}
    linears: dict[str, LinearResult] = {}
    for name, meta in doc["linears"].items():
        codes = None
        if "grid" in meta:
            grid = _grid_from_json(meta["grid"])
            codes = GroupedCodes(
                codes=raw.pop(f"{name}.qcodes").to(torch.int16) + grid.qmin,
                scales=raw.pop(f"{name}.qscales").float(),
                zeros=raw.pop(f"{name}.qzeros").to(torch.int16) if not grid.symmetric else None,
                grid=grid,
            )
        linears[name] = LinearResult(
            name=name,
            weight=raw[f"{name}.weight"],
            codes=codes,
            mean_abs=raw.pop(f"{name}.act_mean_abs", None),
            mean_sq=raw.pop(f"{name}.act_mean_sq", None),
            n_tokens=meta.get("n_tokens", 0),
        )
    return BlockResult(index=doc["index"], tensors=raw, linears=linears, info=doc["info"])
