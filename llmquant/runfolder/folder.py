"""A run folder: its manifest (source, blocks, fingerprint, the persisted plans), its block files
and the tensors they describe, transformed or quantized.

``blocks/manifest.json`` records the quantizer plan every linear was searched and quantized
with, and the plan of each export (for GGUF, every tensor's type); writers, resume, the
evaluator and the benchmarks read both from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmquant.cache import atomic_write_text
from llmquant.errors import InputError, NonFiniteResult
from llmquant.quant.grid import dequantize
from llmquant.quant.plan import QuantizerPlan
from llmquant.quant.results import BlockResult
from llmquant.runfolder.blocks import (
    block_file,
    block_file_problem,
    block_tensor_names,
    block_tensor_shape,
    load_block,
    save_block,
)
from llmquant.tensors import SafetensorsFolder
from llmquant.values import check_result

MANIFEST = "manifest.json"


@dataclass
class RunFolder:
    """A finished (or resumable) run: the source model plus one result file per block."""

    blocks_dir: Path
    source_dir: Path  # the Hugging Face folder the run started from (float weights, tokenizer)
    n_blocks: int
    fingerprint: str  # hash of everything that changes block results; resume checks it
    plan: QuantizerPlan
    layers_path: str = "model.layers"  # block i's tensors are "{layers_path}.{i}.*"
    dtype: str = "float32"  # what the exports store float tensors in (model.dtype)
    exports: dict[str, dict] = field(default_factory=dict)  # export name -> its persisted plan
    # A hash per thing the fingerprint covers, so a refused resume can say what changed.
    fingerprint_parts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, blocks_dir: Path) -> RunFolder:
        path = Path(blocks_dir) / MANIFEST
        if not path.is_file():
            raise InputError(f"{path}: no quantization manifest (not a llmquant run folder)")
        try:
            doc = json.loads(path.read_text())
            return cls(
                blocks_dir=Path(blocks_dir),
                source_dir=Path(doc["source_dir"]),
                n_blocks=int(doc["n_blocks"]),
                fingerprint=doc["fingerprint"],
                plan=QuantizerPlan.from_json(doc["plan"]),
                layers_path=doc.get("layers_path", "model.layers"),
                dtype=doc.get("dtype", "float32"),
                exports=doc.get("exports", {}),
                fingerprint_parts=doc.get("fingerprint_parts", {}),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
            raise InputError(f"{path}: damaged run manifest ({problem})") from None

    def write_manifest(self) -> None:
        doc = {
            "source_dir": str(self.source_dir),
            "n_blocks": self.n_blocks,
            "fingerprint": self.fingerprint,
            "fingerprint_parts": self.fingerprint_parts,
            "layers_path": self.layers_path,
            "dtype": self.dtype,
            "plan": self.plan.to_json(),
            "exports": self.exports,
        }
        atomic_write_text(self.blocks_dir / MANIFEST, json.dumps(doc, indent=2))

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def block_path(self, index: int) -> Path:
        return block_file(self.blocks_dir, index)

    def has_block(self, index: int) -> bool:
        return self.block_path(index).is_file()

    def save_block(self, result: BlockResult) -> None:
        save_block(self.block_path(result.index), result, self.fingerprint)

    def block_problem(self, index: int) -> str | None:
        """Why block ``index``'s file cannot be resumed from (damaged, truncated, made by
        another recipe or model), or None when it can."""
        return block_file_problem(self.block_path(index), self.fingerprint)

    def block(self, index: int) -> BlockResult:
        """Block ``index``'s result; its coded linears must be on the plan's grids."""
        path = self.block_path(index)
        result = load_block(path)
        try:
            check_result(
                f"block {index}",
                [*result.tensors.items(), *((f"{m} scales", lin.codes.scales)
                 for m, lin in result.linears.items() if lin.codes is not None)],
            )  # fmt: skip
        except NonFiniteResult as err:
            raise InputError(
                f"{path}: damaged block file ({err}); delete it and run again with --resume "
                "to recompute it"
            ) from None
        for module, linear in result.linears.items():
            planned = getattr(self.plan.quantizers.get(module), "grid", None)
            if linear.codes is not None and planned is not None:
                if linear.codes.grid != planned:
                    raise InputError(
                        f"{self.block_path(index)}: {module} was quantized as "
                        f"{linear.codes.grid.describe()}, the plan says {planned.describe()}"
                    )
        return result

    def iter_blocks(self) -> Iterator[BlockResult]:
        for i in range(self.n_blocks):
            yield self.block(i)

    def quantized_tensors(self, result: BlockResult) -> dict[str, torch.Tensor]:
        """The block's tensors as the quantized model has them: each planned linear's weight
        dequantized from its codes, or fake-quantized by its planned quantizer (clipping is
        already in the saved float weight, so this reproduces the run)."""
        tensors = dict(result.tensors)
        for module, linear in result.linears.items():
            if linear.codes is not None:
                tensors[module + ".weight"] = dequantize(linear.codes)
            elif module in self.plan:
                quantizer = self.plan.quantizer_for(module)
                tensors[module + ".weight"] = quantizer.fake_quant(
                    linear.weight.float(), linear.mean_sq
                )
        return tensors

    def source(self) -> SafetensorsFolder:
        return SafetensorsFolder(self.source_dir)

    def tensors(self, quantized: bool = False) -> RunTensors:
        return RunTensors(self, quantized)


class RunTensors:
    """The model a run made, as a tensor source: non-block tensors from the source folder, block
    tensors from the block files, transformed (what GGUF writers re-quantize) or ``quantized``
    (what the quantized model computes with). One block is cached at a time."""

    def __init__(self, run: RunFolder, quantized: bool = False) -> None:
        self.run = run
        self.quantized = quantized
        self.source = run.source()
        root = run.layers_path + "."
        self.outer = [n for n in self.source.names() if not n.startswith(root)]
        self.block_of: dict[str, int] = {}
        for i in range(run.n_blocks):
            self.block_of.update({n: i for n in block_tensor_names(run.block_path(i))})
        self._cached: tuple[int, BlockResult, dict[str, torch.Tensor]] | None = None

    def names(self) -> list[str]:
        return [*self.outer, *self.block_of]

    def __contains__(self, name: str) -> bool:
        return name in self.block_of or name in self.outer

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.block_of:
            return block_tensor_shape(self.run.block_path(self.block_of[name]), name)
        return self.source.shape(name)

    def _block(self, index: int) -> tuple[BlockResult, dict[str, torch.Tensor]]:
        if self._cached is None or self._cached[0] != index:
            result = self.run.block(index)
            tensors = self.run.quantized_tensors(result) if self.quantized else result.tensors
            self._cached = (index, result, tensors)
        return self._cached[1], self._cached[2]

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        outer = []
        for name in names:
            if name in self.block_of:
                out[name] = self._block(self.block_of[name])[1][name]
            else:
                outer.append(name)
        out.update(self.source.load(outer))
        return out

    def importance(self, name: str) -> torch.Tensor | None:
        """Mean x² per input channel of the linear whose weight is ``name`` (None if none)."""
        if name not in self.block_of or not name.endswith(".weight"):
            return None
        result, _ = self._block(self.block_of[name])
        linear = result.linears.get(name.removesuffix(".weight"))
        return None if linear is None else linear.mean_sq
