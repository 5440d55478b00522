"""GGML tensor types, byte-exact with llama.cpp, usable as Quantizers for scale and clip search.

``get_ggml_type("q4_k").quantize(w)`` gives the bytes llama-quantize writes for ``w``;
``fake_quant(w, importance)`` is what AWQ search evaluates. See base.GGMLType.
"""

from __future__ import annotations

from llmquant.quant.ggml.base import GGMLType
from llmquant.quant.ggml.iquants import IQ4_NL, IQ4_XS
from llmquant.quant.ggml.kquants16 import Q2_K, Q3_K, Q6_K
from llmquant.quant.ggml.kquants32 import Q4_K, Q5_K
from llmquant.quant.ggml.legacy import BF16, F16, F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

GGML_TYPES: dict[str, GGMLType] = {
    ggml_type.name: ggml_type
    for ggml_type in (
        F32(),
        F16(),
        BF16(),
        Q8_0(),
        Q4_0(),
        Q4_1(),
        Q5_0(),
        Q5_1(),
        Q2_K(),
        Q3_K(),
        Q4_K(),
        Q5_K(),
        Q6_K(),
        IQ4_NL(),
        IQ4_XS(),
    )
}


def get_ggml_type(name: str) -> GGMLType:
    """The GGML type called ``name`` (case-insensitive), e.g. "Q4_K" or "q8_0"."""
    ggml_type = GGML_TYPES.get(name.upper())
    if ggml_type is None:
        raise ValueError(f"unknown GGML type {name!r}; known types: {', '.join(GGML_TYPES)}")
    return ggml_type


def fitting_types(in_features: int) -> list[str]:
    """Names of the quantized types whose block size divides ``in_features``."""
    return [
        name
        for name, ggml_type in GGML_TYPES.items()
        if ggml_type.block_size > 1 and in_features % ggml_type.block_size == 0
    ]


__all__ = ["GGMLType", "GGML_TYPES", "fitting_types", "get_ggml_type"]
