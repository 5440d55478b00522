"""Hugging Face -> GGUF, per architecture: names, row permutation, norm shift, hyperparameters.

Architecture knowledge as data: one ``GgufArch`` per family, looked up from ``config.json``'s
``architectures`` (or ``model_type``). What each entry says follows llama.cpp's converter
(``convert_hf_to_gguf.py`` + ``conversion/{base,llama,qwen,gemma}.py`` at 0c1e570):
- llama-family files store q/k rows in the interleaved rope layout, so ``q_proj`` and
  ``k_proj`` weights and biases are permuted (with n_head resp. n_head_kv);
- Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp's by ``weight``, so norms get +1;
- Gemma/Gemma2 never use ``lm_head`` (always the embedding); a tied model writes no ``output``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import torch

from llmquant.export.gguf.mixes import ArchInfo

# HF tensors that hold no weights llama.cpp reads.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def _base_kv(cfg: dict) -> dict[str, Any]:
    """The keys every text model gets (conversion/base.py TextModel.set_gguf_parameters)."""
    kv: dict[str, Any] = {
        "block_count": cfg["num_hidden_layers"],
        "context_length": cfg.get("max_position_embeddings"),
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg.get("intermediate_size"),
        "head_count": cfg["num_attention_heads"],
        "head_count_kv": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "layer_norm_rms_eps": cfg.get("rms_norm_eps"),
    }
    rope = _rope_params(cfg)
    full = rope.get("full_attention", rope)
    if full.get("rope_theta") is not None:
        kv["rope_freq_base"] = float(full["rope_theta"])
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        kv["rope_freq_base_swa"] = float(local)
    rope_type, factor = full.get("rope_type"), full.get("factor")
    if rope_type == "linear" and factor is not None:
        kv["rope_scaling_type"] = gguf.RopeScalingType.LINEAR
        kv["rope_scaling_factor"] = float(factor)
    elif rope_type == "yarn" and factor is not None:
        kv["rope_scaling_type"] = gguf.RopeScalingType.YARN
        kv["rope_scaling_factor"] = float(factor)
        kv["rope_scaling_orig_ctx_len"] = full["original_max_position_embeddings"]
    elif rope_type not in (None, "default", "llama3"):
        raise ValueError(
            f"config.json: rope type {rope_type!r} is not supported by the GGUF writer"
        )
    if cfg.get("head_dim") is not None:
        kv["key_length"] = kv["value_length"] = cfg["head_dim"]
    return {k: v for k, v in kv.items() if v is not None}


def _rope_params(cfg: dict) -> dict:
    """Rope settings in transformers-5 form (``rope_parameters``) or the older flat keys."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        rope.setdefault("rope_theta", cfg.get("rope_theta"))
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        if cfg.get("rope_local_base_freq") is not None:
            rope["sliding_attention"] = {"rope_theta": cfg["rope_local_base_freq"]}
    return rope


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _llama_kv(cfg: dict) -> dict[str, Any]:
    return {
        **_base_kv(cfg),
        "vocab_size": cfg["vocab_size"],
        "rope_dimension_count": _head_dim(cfg),
    }


def _gemma2_kv(cfg: dict) -> dict[str, Any]:
    kv = _base_kv(cfg)
    kv.pop("rope_freq_base", None)  # the converter writes none; llama.cpp's default is 10000
    kv["attn_logit_softcapping"] = cfg.get("attn_logit_softcapping")
    kv["final_logit_softcapping"] = cfg.get("final_logit_softcapping")
    kv["sliding_window"] = cfg.get("sliding_window")
    kv["key_length"] = kv["value_length"] = cfg["head_dim"]
    return {k: v for k, v in kv.items() if v is not None}


def _gemma3_kv(cfg: dict) -> dict[str, Any]:
    kv = _base_kv(cfg)
    kv.setdefault("context_length", 131072)
    kv.setdefault("rope_freq_base", 1_000_000.0)
    kv.setdefault("layer_norm_rms_eps", 1e-6)
    kv["key_length"] = kv["value_length"] = cfg.get("head_dim", 256)
    if cfg.get("final_logit_softcapping"):
        kv["final_logit_softcapping"] = cfg["final_logit_softcapping"]
    if cfg.get("sliding_window_pattern") != 1 and cfg.get("sliding_window"):
        kv["sliding_window"] = cfg["sliding_window"]
    return kv


def _llama3_rope_factors(cfg: dict) -> torch.Tensor | None:
    """Llama-3.1 style rope scaling lives in a ``rope_freqs`` tensor (conversion/llama.py)."""
    full = _rope_params(cfg)
    full = full.get("full_attention", full)
    if str(full.get("rope_type", "")).lower() != "llama3":
        return None
    base, dim = full.get("rope_theta", 10000.0), _head_dim(cfg)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = full.get("factor", 8.0)
    low, high = full.get("low_freq_factor", 1.0), full.get("high_freq_factor", 4.0)
    old_ctx = full.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


@dataclass(frozen=True)
class GgufArch:
    arch: gguf.MODEL_ARCH
    hparams: Callable[[dict], dict[str, Any]]
    permute_qk: bool = False  # llama-family rope row layout
    norm_shift: float = 0.0  # added to every ``*norm.weight``
    lm_head_unused: bool = False  # llama.cpp always reuses the embedding as output
    add_space_prefix: bool | None = (
        None  # tokenizer.ggml.add_space_prefix, where the converter sets it
    )
    extra_tensors: Callable[[dict], dict[str, torch.Tensor]] = field(default=lambda cfg: {})

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _llama_extra(cfg: dict) -> dict[str, torch.Tensor]:
    factors = _llama3_rope_factors(cfg)
    return {} if factors is None else {"rope_freqs.weight": factors}


LLAMA = GgufArch(gguf.MODEL_ARCH.LLAMA, _llama_kv, permute_qk=True, extra_tensors=_llama_extra)
QWEN2 = GgufArch(gguf.MODEL_ARCH.QWEN2, _base_kv)
QWEN3 = GgufArch(gguf.MODEL_ARCH.QWEN3, _base_kv)
GEMMA2 = GgufArch(
    gguf.MODEL_ARCH.GEMMA2, _gemma2_kv, norm_shift=1.0, lm_head_unused=True, add_space_prefix=False
)
GEMMA3 = GgufArch(gguf.MODEL_ARCH.GEMMA3, _gemma3_kv, norm_shift=1.0, add_space_prefix=False)

GGUF_ARCHS: dict[str, GgufArch] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": GEMMA3,
}
_BY_MODEL_TYPE = {"llama": LLAMA, "mistral": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3,
                  "gemma2": GEMMA2, "gemma3_text": GEMMA3}  # fmt: skip


def resolve_gguf_arch(config: dict) -> GgufArch:
    """The entry for a ``config.json`` (``architectures`` first, then ``model_type``)."""
    for name in config.get("architectures") or []:
        if name in GGUF_ARCHS:
            return GGUF_ARCHS[name]
    if config.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[config["model_type"]]
    raise ValueError(
        f"config.json: architecture {config.get('architectures')} / model_type "
        f"{config.get('model_type')!r} has no GGUF mapping; supported: {', '.join(GGUF_ARCHS)}"
    )


def arch_info(config: dict) -> ArchInfo:
    """What llama.cpp's mix rules look at, from ``config.json``."""
    n_head = config["num_attention_heads"]
    return ArchInfo(
        arch=resolve_gguf_arch(config).name,
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads", n_head),
        n_expert=config.get("num_local_experts", 0) or 0,
    )


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rope rows -> llama.cpp's interleaved pairs, per head (weights or biases)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows into {n_head} rope heads")
    # [n_head, 2, rows/n_head/2, *rest] -> swap the half index with the pair index
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``permute_rows``."""
    rows = w.shape[0]
    # [n_head, rows/n_head/2, 2, *rest] -> back to [n_head, 2, rows/n_head/2, *rest]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class TensorMapper:
    """Maps one model's HF tensors to GGUF names and values (permuted/shifted for llama.cpp)."""

    def __init__(self, config: dict):
        self.config = config
        self.spec = resolve_gguf_arch(config)
        self.n_head = config["num_attention_heads"]
        self.n_head_kv = config.get("num_key_value_heads", self.n_head)
        self.tied = bool(config.get("tie_word_embeddings", False))
        self._map = gguf.get_tensor_name_map(self.spec.arch, config["num_hidden_layers"])

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for a tensor llama.cpp does not read (tied lm_head, buffers)."""
        if hf_name.endswith(_SKIP_SUFFIXES):
            return None
        if hf_name == "lm_head.weight" and (self.tied or self.spec.lm_head_unused):
            return None
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(
                f"tensor {hf_name!r} has no GGUF name for architecture {self.spec.name!r}"
            )
        return name

    def convert(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The value written under the GGUF name (float32)."""
        t = tensor.detach().to(torch.float32)
        if self.spec.permute_qk:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_rows(t, self.n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_rows(t, self.n_head_kv)
        if self.spec.norm_shift and hf_name.endswith("norm.weight"):
            t = t + self.spec.norm_shift
        return t

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return self.spec.extra_tensors(self.config)

    def unconvert(self, hf_name: str, data: np.ndarray) -> torch.Tensor:
        """Inverse of ``convert`` (for checks): GGUF values back to the HF layout."""
        t = torch.from_numpy(np.asarray(data, dtype=np.float32).copy())
        if self.spec.norm_shift and hf_name.endswith("norm.weight"):
            t = t - self.spec.norm_shift
        if self.spec.permute_qk:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = unpermute_rows(t, self.n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = unpermute_rows(t, self.n_head_kv)
        return t
