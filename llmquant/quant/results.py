"""The format-neutral quantization result, one safetensors file per decoder block.

Every writer (AutoAWQ GEMM, compressed-tensors, GGUF) reads these files and only packs. A block
file holds, under the module's full Hugging Face name:
- every float tensor of the block after the transforms (AWQ scales folded into norms and linears,
  clipping applied), e.g. ``model.layers.3.input_layernorm.weight``;
- for each quantized linear ``P``: ``P.qcodes`` (uint8, code - qmin), ``P.qscales`` (float16,
  [out, n_groups]), ``P.qzeros`` (uint8, asymmetric grids only);
- for each linear with statistics: ``P.act_mean_abs`` and ``P.act_mean_sq`` (float32, [in]).
The file's metadata holds a JSON document with the grid of every quantized linear, token counts
and the block's search losses. Files are written to a temporary name and renamed when complete,
so a block file that exists is whole (this is what makes ``--resume`` safe).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmquant.quant.grid import GroupedCodes, IntGrid

MANIFEST = "manifest.json"


@dataclass
class LinearResult:
    """One linear layer: transformed float weight, optional integer codes, activation stats."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    weight: torch.Tensor  # float [out, in], transformed (scales folded, clip applied)
    codes: GroupedCodes | None = None
    mean_abs: torch.Tensor | None = None  # [in]
    mean_sq: torch.Tensor | None = None  # [in]
    n_tokens: int = 0


@dataclass
class BlockResult:
    index: int
    tensors: dict[str, torch.Tensor]  # every float tensor of the block by full name
    linears: dict[str, LinearResult]  # by module path
    info: dict = field(default_factory=dict)  # losses and timings, JSON-serialisable


def block_file(run_blocks_dir: Path, index: int) -> Path:
    return run_blocks_dir / f"block_{index:04d}.safetensors"


def _grid_to_json(grid: IntGrid) -> dict:
    return {"bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric}


def save_block(path: Path, result: BlockResult) -> None:
    """Write ``result`` to ``path`` atomically (temporary name, then rename)."""
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
            tensors[f"{name}.qscales"] = lin.codes.scales.to(torch.float16).contiguous()
            if lin.codes.zeros is not None:
                tensors[f"{name}.qzeros"] = lin.codes.zeros.to(torch.uint8).contiguous()
        if lin.mean_abs is not None:
            tensors[f"{name}.act_mean_abs"] = lin.mean_abs.float().contiguous()
        if lin.mean_sq is not None:
            tensors[f"{name}.act_mean_sq"] = lin.mean_sq.float().contiguous()
        linears_meta[name] = meta
    doc = {"index": result.index, "linears": linears_meta, "info": result.info}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"llmquant": json.dumps(doc)})
    os.replace(tmp, path)


def load_block(path: Path) -> BlockResult:
    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["llmquant"])
        raw = {k: f.get_tensor(k) for k in f.keys()}
    linears: dict[str, LinearResult] = {}
    for name, meta in doc["linears"].items():
        codes = None
        if "grid" in meta:
            grid = IntGrid(**meta["grid"])
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


@dataclass
class QuantizedRun:
    """A finished (or resumable) run folder: the source model plus one result file per block."""

    blocks_dir: Path
    source_dir: Path  # the Hugging Face folder the run started from (float weights, tokenizer)
    n_blocks: int
    fingerprint: str  # hash of everything that changes block results; resume checks it

    @classmethod
    def open(cls, blocks_dir: Path) -> QuantizedRun:
        path = Path(blocks_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no quantization manifest (not a llmquant run folder)")
        doc = json.loads(path.read_text())
        return cls(
            blocks_dir=Path(blocks_dir),
            source_dir=Path(doc["source_dir"]),
            n_blocks=int(doc["n_blocks"]),
            fingerprint=doc["fingerprint"],
        )

    def write_manifest(self) -> None:
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "source_dir": str(self.source_dir),
            "n_blocks": self.n_blocks,
            "fingerprint": self.fingerprint,
        }
        tmp = self.blocks_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.blocks_dir / MANIFEST)

    def has_block(self, index: int) -> bool:
        return block_file(self.blocks_dir, index).is_file()

    def block(self, index: int) -> BlockResult:
        return load_block(block_file(self.blocks_dir, index))

    def iter_blocks(self) -> Iterator[BlockResult]:
        for i in range(self.n_blocks):
            yield self.block(i)
