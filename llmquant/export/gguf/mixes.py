"""llama.cpp's quantization mixes (Q4_K_M and friends) as data: which GGML type each tensor gets.

Reproduces ``llama_tensor_get_type`` of ``src/llama-quant.cpp`` (llama.cpp 0c1e570, the version
vendored in llama-cpp-python 0.3.36) for the legacy, K-quant and IQ4_NL/IQ4_XS file types (not
the 1-3 bit IQ ones): the output / tied-embedding rule, the per-category bumps (attn_v, ffn_down,
attn_output) driven by the running counters ``i_attention_wv`` / ``i_ffn_down`` over the tensors
in llama.cpp's order (by layer, then name), the ``use_more_bits`` layer pattern, the imatrix
rules (Q4_0/Q5_0 ffn_down with one, IQ4 ffn_down without one), the 70B and 8-expert bumps, and
the fallback when a row length is not a multiple of the block size (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, then F16 if even that does not divide).
Falcon's special cases are not reproduced (we write no Falcon files).

Shapes are given in torch/numpy order: ``shape[-1]`` is the row length (ggml's ``ne[0]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import gguf

F32, F16, BF16 = "F32", "F16", "BF16"


@dataclass(frozen=True)
class Mix:
    name: str
    file_type: gguf.LlamaFileType  # written to general.file_type
    default: str  # GGML type of the ordinary 2-D weights


def _mix(name: str, file_type: str, default: str) -> Mix:
    return Mix(name, gguf.LlamaFileType[file_type], default)


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        _mix("F32", "ALL_F32", F32),
        _mix("F16", "MOSTLY_F16", F16),
        _mix("BF16", "MOSTLY_BF16", BF16),
        _mix("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
        _mix("Q4_0", "MOSTLY_Q4_0", "Q4_0"),
        _mix("Q4_1", "MOSTLY_Q4_1", "Q4_1"),
        _mix("Q5_0", "MOSTLY_Q5_0", "Q5_0"),
        _mix("Q5_1", "MOSTLY_Q5_1", "Q5_1"),
        _mix("Q2_K", "MOSTLY_Q2_K", "Q2_K"),
        _mix("Q2_K_S", "MOSTLY_Q2_K_S", "Q2_K"),
        _mix("Q3_K_S", "MOSTLY_Q3_K_S", "Q3_K"),
        _mix("Q3_K_M", "MOSTLY_Q3_K_M", "Q3_K"),
        _mix("Q3_K_L", "MOSTLY_Q3_K_L", "Q3_K"),
        _mix("Q4_K_S", "MOSTLY_Q4_K_S", "Q4_K"),
        _mix("Q4_K_M", "MOSTLY_Q4_K_M", "Q4_K"),
        _mix("Q5_K_S", "MOSTLY_Q5_K_S", "Q5_K"),
        _mix("Q5_K_M", "MOSTLY_Q5_K_M", "Q5_K"),
        _mix("Q6_K", "MOSTLY_Q6_K", "Q6_K"),
        _mix("IQ4_NL", "MOSTLY_IQ4_NL", "IQ4_NL"),
        _mix("IQ4_XS", "MOSTLY_IQ4_XS", "IQ4_XS"),
    )
}

# Where a row length is not a multiple of a 256-block type's block size.
FALLBACK = {
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}  # fmt: skip


@dataclass(frozen=True)
class ArchInfo:
    """The few hyperparameters llama.cpp's type choice looks at."""

    arch: str  # GGUF architecture name, e.g. "llama"
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama.cpp labels a model 70B from its layer count alone (llama: 80 layers with GQA).
        if self.arch == "llama":
            return self.n_layer == 80 and self.n_head != self.n_head_kv
        return self.arch == "qwen2" and self.n_layer == 80


def block_size(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def is_quantized(type_name: str) -> bool:
    return type_name not in (F32, F16, BF16)


def get_mix(name: str) -> Mix:
    try:
        return MIXES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown GGUF mix {name!r}; supported: {', '.join(MIXES)}") from None


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's pattern of layers that get one more step: first/last eighth, every third."""
    return (
        i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2
    )


# --- per-category rules: (mix -> rule(i, n, arch, has_imatrix) -> type or None for "keep") ---
Rule = Callable[[int, int, ArchInfo, bool], "str | None"]


def _const(t: str) -> Rule:
    return lambda i, n, a, imx: t


ATTN_V_RULES: dict[str, Rule] = {
    "Q2_K": lambda i, n, a, imx: "Q4_K" if a.n_gqa >= 4 else "Q3_K",
    "Q2_K_S": lambda i, n, a, imx: "Q4_K" if a.n_gqa >= 4 else None,
    "Q3_K_M": lambda i, n, a, imx: "Q5_K" if i < 2 else "Q4_K",
    "Q3_K_L": _const("Q5_K"),
    "Q4_K_M": lambda i, n, a, imx: "Q6_K" if use_more_bits(i, n) else None,
    "Q5_K_M": lambda i, n, a, imx: "Q6_K" if use_more_bits(i, n) else None,
    "Q4_K_S": lambda i, n, a, imx: "Q5_K" if i < 4 else None,
    "IQ4_NL": lambda i, n, a, imx: "Q5_K" if a.n_gqa >= 4 else None,
    "IQ4_XS": lambda i, n, a, imx: "Q5_K" if a.n_gqa >= 4 else None,
}

FFN_DOWN_RULES: dict[str, Rule] = {
    "Q2_K": _const("Q3_K"),
    "Q2_K_S": lambda i, n, a, imx: "Q4_K" if i < n // 8 else None,
    "Q3_K_M": lambda i, n, a, imx: "Q5_K" if i < n // 16 else "Q4_K",
    "Q3_K_L": _const("Q5_K"),
    "Q4_K_M": lambda i, n, a, imx: "Q6_K" if use_more_bits(i, n) else None,
    "Q5_K_M": lambda i, n, a, imx: "Q6_K" if use_more_bits(i, n) else None,
    "Q4_K_S": lambda i, n, a, imx: "Q5_K" if i < n // 8 else None,
    # "Guard against craziness in the first few ffn_down layers", only with an imatrix.
    "Q4_0": lambda i, n, a, imx: "Q4_1" if imx and i < n // 8 else None,
    "Q5_0": lambda i, n, a, imx: "Q5_1" if imx and i < n // 8 else None,
    # The IQ4 mixes bump the first eighth only when no imatrix is given.
    "IQ4_NL": lambda i, n, a, imx: "Q5_K" if not imx and i < n // 8 else None,
    "IQ4_XS": lambda i, n, a, imx: "Q5_K" if not imx and i < n // 8 else None,
}

ATTN_OUTPUT_TYPES = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}
ATTN_OUTPUT_TYPES_8_EXPERTS = dict.fromkeys(
    ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS"), "Q5_K"
)


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category: first matching substring wins, in this order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),  # qkv and kv_b count as attn_v ("more sensitive")
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


_NOT_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "attn_rel_b.weight",
    "position_embd",
    "token_types",
)


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes only 2-D/3-D ``*weight`` tensors that are not norms and the like."""
    return (
        len(shape) >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)
    )


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(names: list[str]) -> list[str]:
    """The order llama-quantize visits tensors in (its counters depend on it)."""
    return sorted(names, key=lambda n: (_layer(n), n))


def fallback_type(cols: int, t: str) -> str:
    """The type llama-quantize writes when ``t`` does not fit a row of ``cols`` values."""
    if cols % block_size(t) == 0:
        return t
    t2 = FALLBACK.get(t, t)
    return t2 if cols % block_size(t2) == 0 else F16


def tensor_types(
    mix: str,
    arch_info: ArchInfo,
    tensor_shapes: Mapping[str, tuple[int, ...]],
    has_imatrix: bool,
) -> dict[str, str]:
    """The GGML type llama-quantize gives each tensor (GGUF names) for ``mix``."""
    m = get_mix(mix)
    names = llama_order(list(tensor_shapes))
    tied = "output.weight" not in tensor_shapes
    n_wv = sum(_category(n) == "attn_v" for n in names)
    n_ffn_down = arch_info.n_layer
    i_wv = i_ffn_down = 0
    out: dict[str, str] = {}
    for name in names:
        shape = tuple(tensor_shapes[name])
        if not allows_quantization(name, shape):
            out[name] = F32
            continue
        if not is_quantized(m.default):
            out[name] = m.default
            continue
        cols = shape[-1]
        cat = _category(name)
        t = m.default
        if cat == "output" or (tied and cat == "token_embd"):
            if cols % block_size(t) != 0:
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif cat == "attn_v":
            rule = ATTN_V_RULES.get(m.name)
            t = (rule(i_wv, n_wv, arch_info, has_imatrix) if rule else None) or t
            if arch_info.is_70b and t in ("Q3_K", "Q4_K"):
                t = "Q5_K"
            if arch_info.n_expert == 8:
                t = "Q8_0"
            i_wv += 1
        elif cat == "attn_k":
            if arch_info.n_expert == 8:
                t = "Q8_0"
        elif cat == "ffn_down":
            rule = FFN_DOWN_RULES.get(m.name)
            t = (rule(i_ffn_down, n_ffn_down, arch_info, has_imatrix) if rule else None) or t
            i_ffn_down += 1
        elif cat == "attn_output":
            table = ATTN_OUTPUT_TYPES_8_EXPERTS if arch_info.n_expert == 8 else ATTN_OUTPUT_TYPES
            t = table.get(m.name, t)
        if (
            m.name == "Q2_K_S"
            and t == "Q2_K"
            and not has_imatrix
            and cat
            not in (
                "output",
                "token_embd",
            )
        ):
            raise ValueError(f"mix Q2_K_S needs importance statistics for {name} (Q2_K)")
        out[name] = fallback_type(cols, t)
    return out
