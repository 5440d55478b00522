"""Architecture knowledge as data: one table from Hugging Face architecture names to a spec.

A spec says where the decoder blocks live, which linears each AWQ scale group covers (the op
whose output feeds them, and the module whose output the search compares), which layers are
never clipped, and norm quirks such as Gemma's ``1 + weight``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from llmquant.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleGroup:
    """An AWQ scale group inside one block (paths relative to the block)."""

    prev: str  # the norm or linear whose output feeds ``linears``; scales are folded into it
    linears: tuple[str, ...]
    inspect: str  # module whose output the search compares against full precision
    # For a fused previous linear (Phi-3's gate_up_proj), which chunk of its output rows
    # feeds ``linears``: (chunk index, number of chunks).
    prev_rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ArchSpec:
    name: str
    scale_groups: tuple[ScaleGroup, ...] = ()
    # Linear names (last path component) that clip search leaves alone: q and k feed a softmax
    # through a dot product, where clipping errors are amplified.
    no_clip: tuple[str, ...] = ("q_proj", "k_proj", "qkv_proj")
    norm_plus_one: bool = False  # Gemma: y = x_normed * (1 + weight)


_LLAMA_GROUPS = (
    ScaleGroup(
        "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
    ),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

_GEMMA_GROUPS = (
    ScaleGroup(
        "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
    ),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

_PHI3_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_rows=(1, 2)),
)

LLAMA = ArchSpec("llama", scale_groups=_LLAMA_GROUPS)
GEMMA = ArchSpec("gemma", scale_groups=_GEMMA_GROUPS, norm_plus_one=True)
PHI3 = ArchSpec("phi3", scale_groups=_PHI3_GROUPS)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,  # q_norm/k_norm act after q/k_proj: input scaling is unaffected
    "Gemma2ForCausalLM": GEMMA,
    "Gemma3ForCausalLM": GEMMA,
    "Phi3ForCausalLM": PHI3,
}


class ArchError(InputError):
    """The model's architecture has no spec and no checked default fits."""


def _prev_out_width(block: nn.Module, group: ScaleGroup) -> int | None:
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        chunks = group.prev_rows[1] if group.prev_rows else 1
        return prev.out_features // chunks
    weight = getattr(prev, "weight", None)
    return None if weight is None else int(weight.shape[0])


def usable_groups(spec: ArchSpec, block: nn.Module) -> list[ScaleGroup]:
    """Groups of ``spec`` whose widths match in this block; a mismatched group is skipped.

    v_proj -> o_proj is skipped under grouped-query attention, where v's output is narrower
    than o's input (the usual AWQ rule).
    """
    groups = []
    for group in spec.scale_groups:
        width = _prev_out_width(block, group)
        ins = {block.get_submodule(name).in_features for name in group.linears}
        if width is not None and ins == {width}:
            groups.append(group)
    return groups


def check_block(spec: ArchSpec, block: nn.Module) -> None:
    """Every module a spec names exists; raise ArchError naming the first one that does not."""
    for group in spec.scale_groups:
        for path in (group.prev, group.inspect, *group.linears):
            try:
                block.get_submodule(path)
            except AttributeError:
                raise ArchError(
                    f"architecture spec {spec.name!r}: block has no module {path!r}"
                ) from None


def resolve_arch(architectures: list[str] | None, block: nn.Module) -> ArchSpec:
    """The spec for a model's ``config.architectures``, checked against its first block."""
    names = architectures or []
    for name in names:
        if name in ARCHITECTURES:
            spec = ARCHITECTURES[name]
            check_block(spec, block)
            return spec
    # Checked default: a Llama-shaped block gets the Llama spec, with a log line saying so.
    try:
        check_block(LLAMA, block)
    except ArchError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ArchError(
            f"architecture {names or '(none in config.json)'} has no spec and its blocks are not "
            f"Llama-shaped; supported: {known}"
        ) from None
    log.warning("architecture %s has no spec; using the Llama spec (block layout matches)", names)
    return LLAMA
