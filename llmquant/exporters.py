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
            from llmquant.export.gguf_run import write_gguf_exports

            outputs.update(write_gguf_exports(run, item, out_dir))
        log.info("exported %s", name)
    return outputs
