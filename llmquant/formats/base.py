"""The two kinds of registered format and what a format is asked for.

A :class:`QuantFormat` (``quant.format`` in a recipe: the int grid, GGML types) owns its
``quant`` section and decides the quantizer plan. An :class:`OutputFormat` (an ``export`` kind:
AutoAWQ GEMM, compressed-tensors, GGUF) owns its export section, its compatibility check
against the recipe and the plan (run before the first block), the plan it persists (e.g. GGUF
tensor types), its writer and its reader. A subclass that sets ``name`` / ``kind`` registers
itself (``__init_subclass__``, as gguf-py registers one class per quantization type).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from llmquant.quant.plan import QuantizerPlan
from llmquant.runfolder import RunFolder
from llmquant.schema import Strict
from llmquant.tensors import TensorSource

QUANT_FORMATS: dict[str, QuantFormat] = {}
OUTPUT_FORMATS: dict[str, OutputFormat] = {}


@dataclass
class PlanContext:
    """What a plan and a check may look at before any block is loaded."""

    config: dict  # the source's config.json
    source: TensorSource  # the source model's tensors (names and shapes)
    targets: dict[str, tuple[int, int]]  # module path -> (out, in) of every linear to quantize
    dtype: torch.dtype = torch.float32  # what the weights are exported in (model.dtype)
    source_dir: Path | None = None  # the model folder (config, tokenizer), when there is one


def measured_errors(block_info: list[dict]) -> dict[str, dict[str, float]]:
    """Module path -> candidate -> error, gathered from every block's info, each block's times
    its ``downstream_gain`` (``calib.downstream``: what its output's errors cost at the
    model's output) where it has one."""
    errors: dict[str, dict[str, float]] = {}
    for info in block_info:
        gain = info.get("downstream_gain", 1.0)
        for module, by_type in info.get("candidate_errors", {}).items():
            errors[module] = {t: e * gain for t, e in by_type.items()}
    return errors


class QuantSection(Strict):
    """The keys every ``quant`` section has."""

    # Linears left in float: exact module paths, dotted suffixes or ``re:`` patterns
    # (``llmquant.quant.plan.is_ignored``).
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class QuantFormat:
    name: ClassVar[str]
    section: ClassVar[type[Strict]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            QUANT_FORMATS[cls.name] = cls()

    def plan(self, quant: Any, exports: list[Any], ctx: PlanContext) -> QuantizerPlan:
        """The quantizer of every target linear (``exports``: the recipe's export sections)."""
        raise NotImplementedError

    def measured_candidates(self, quant: Any, exports: list[Any], ctx: PlanContext) -> dict:
        """Module path -> quantizers whose output errors each block measures (for a later
        allocation); none by default."""
        return {}


class OutputFormat:
    kind: ClassVar[str]
    section: ClassVar[type[Strict]]
    # The ``quantization_config.quant_method`` of folders this format writes (None: not a folder).
    quant_method: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            OUTPUT_FORMATS[cls.kind] = cls()

    def check(
        self, where: str, section: Any, quant: Any, plan: QuantizerPlan, ctx: PlanContext
    ) -> None:
        """Raise InputError naming ``where`` (e.g. ``export[1]``) if this export cannot be
        written from a run of ``quant`` with ``plan``."""

    def export_plan(
        self, section: Any, quant: Any, plan: QuantizerPlan, ctx: PlanContext
    ) -> dict:
        """What the writer must use and the run folder persists (JSON); {} when nothing."""
        return {}

    def written_names(self, section: Any, name: str, model_name: str) -> list[str]:
        """The names in ``--out`` this export writes (a folder called ``name`` by default)."""
        return [name]

    def needs_statistics(self, section: Any, export_plan: dict) -> bool:
        """Whether the writer reads the run's activation statistics (e.g. GGUF importance), so
        a run without a search must still gather them."""
        return False

    def finish_plan(
        self, run: RunFolder, name: str, section: Any, quant: Any, ctx: PlanContext,
        block_info: list[dict],
    ) -> dict | None:  # fmt: skip
        """After the last block: complete the export's persisted plan from what the blocks
        measured (``block_info``: each block's info); returns what the report says of it,
        with ``output``: the key of the allocated output among those ``write`` returns."""
        return None

    def write(
        self, run: RunFolder, name: str, section: Any, out_dir: Path, model_name: str
    ) -> dict[str, str]:
        """Write the export; returns output name -> path."""
        raise NotImplementedError

    def detect(self, path: Path, quantization_config: dict) -> bool:
        """Whether ``path`` (with its config's ``quantization_config``) is in this format."""
        return (
            self.quant_method is not None
            and quantization_config.get("quant_method") == self.quant_method
        )

    def open(self, path: Path, quantization_config: dict) -> TensorSource:
        """The plain model's tensors of an output in this format (packed linears unpacked)."""
        raise NotImplementedError
