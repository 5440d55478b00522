"""Dispatch a finished run to the writers the recipe lists (writers live in llmquant.export)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmquant.quant.results import QuantizedRun
from llmquant.recipe import Recipe

log = logging.getLogger(__name__)


def export_all(recipe: Recipe, run: QuantizedRun, out_dir: Path) -> dict[str, str]:
    """Write every export of the recipe; return output name -> path."""
    outputs: dict[str, str] = {}
    for item in recipe.export:
        name = item.name or item.kind
        if item.kind == "awq-gemm":
            from llmquant.export.awq_gemm import write_awq_gemm

            path = write_awq_gemm(
                run,
                out_dir / name,
                ignore=recipe.quant.ignore,
                max_shard_bytes=int(item.max_shard_gb * 2**30),
            )
            outputs[name] = str(path)
        elif item.kind == "compressed-tensors":
            from llmquant.export.compressed_tensors import write_compressed_tensors

            path = write_compressed_tensors(
                run,
                out_dir / name,
                ignore=recipe.quant.ignore,
                max_shard_bytes=int(item.max_shard_gb * 2**30),
            )
            outputs[name] = str(path)
        elif item.kind == "gguf":
            outputs.update(_write_ggufs(run, item, out_dir, recipe.name))
        log.info("exported %s", name)
    return outputs


def _write_ggufs(run: QuantizedRun, item, out_dir: Path, model_name: str) -> dict[str, str]:
    """One GGUF file per type of ``item`` from the same run (same transformed weights)."""
    from llmquant.export.gguf.writer import RunTensors, write_gguf

    tensors = RunTensors(run)
    if not item.importance:
        tensors = _WithoutImportance(tensors)
    outputs = {}
    for ftype in item.types:
        name = f"{item.name or 'gguf'}-{ftype}"
        path = out_dir / f"{model_name}-{ftype}.gguf"
        write_gguf(run.source_dir, tensors, path, ftype, name=model_name)
        outputs[name] = str(path)
    return outputs


class _WithoutImportance:
    """A re-iterable tensor source with the importance dropped (plain llama.cpp rounding)."""

    def __init__(self, source) -> None:
        self.source = source

    def shapes(self):
        return self.source.shapes()

    def __iter__(self):
        for name, tensor, _ in self.source:
            yield name, tensor, None
