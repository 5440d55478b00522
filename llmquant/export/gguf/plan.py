"""Per-linear GGML quantizers for a llama.cpp mix: what AWQ searches under for a GGUF target.

llama.cpp's mixes give different tensors different types (and fall back to legacy types where a
row is not a multiple of 256), so the quantizer searched for each linear is the type the mix
gives its tensor in the file we will write (DESIGN.md principle 4).
"""

from __future__ import annotations

import json

from llmquant.export.gguf.mixes import tensor_types
from llmquant.export.gguf.names import TensorMapper, arch_info
from llmquant.quant.ggml import get_ggml_type
from llmquant.quant.quantizers import Quantizer, QuantizerPlan


def linear_types(mix: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """HF module path -> GGML type name for every 2-D ``*.weight`` of ``shapes`` (HF names)."""
    mapper = TensorMapper(config)
    gguf_shapes, gguf_of = {}, {}
    for hf_name, shape in shapes.items():
        gguf_name = mapper.gguf_name(hf_name)
        if gguf_name is None:
            continue
        gguf_of[hf_name] = gguf_name
        gguf_shapes[gguf_name] = tuple(shape)
    types = tensor_types(mix, arch_info(config), gguf_shapes, has_imatrix=True)
    return {
        hf.removesuffix(".weight"): types[g]
        for hf, g in gguf_of.items()
        if hf.endswith(".weight") and len(shapes[hf]) == 2
    }


def gguf_quantizer_plan(mix: str, streamed) -> QuantizerPlan:
    """The plan for a ``llmquant.model.stream.StreamedModel`` exported with ``mix``."""
    config = json.loads((streamed.folder / "config.json").read_text())
    shapes = {n: tuple(p.shape) for n, p in streamed.model.named_parameters()}
    types = linear_types(mix, config, shapes)

    def quantizer_for(module: str) -> Quantizer:
        if module not in types:
            raise ValueError(f"{module}: no GGUF tensor type in mix {mix}")
        return get_ggml_type(types[module])

    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    summary = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    return QuantizerPlan(f"GGUF {mix} ({summary})", quantizer_for)
