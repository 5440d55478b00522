"""Which quantizer each linear is searched and quantized with, and which linears are left out.

The plan is decided once, before the first block, by the recipe's quantization format
(``llmquant.formats``), and persisted in the run folder; the search, resume, the writers, the
evaluator and the benchmarks read it from there and never recompute it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from llmquant.quant.quantizers import Quantizer, quantizer_from_spec


def is_ignored(module: str, patterns: Iterable[str]) -> bool:
    """Whether one of ``patterns`` names ``module`` (a full module path).

    ``re:REGEX`` matches from the start of the path (``re.match``, as llm-compressor and
    compressed-tensors read their ``ignore`` lists, so ``re:.*down_proj`` is a suffix); any
    other pattern is the exact path or a dotted suffix of it (``lm_head``, ``mlp.down_proj``).
    """
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


@dataclass
class QuantizerPlan:
    """Full module path -> quantizer, for every linear that is quantized (others stay float)."""

    name: str  # one line for logs and the report, e.g. "int4 g64 asym"
    quantizers: dict[str, Quantizer]

    def __contains__(self, module: str) -> bool:
        return module in self.quantizers

    def quantizer_for(self, module: str) -> Quantizer:
        if module not in self.quantizers:
            raise KeyError(f"{module}: not in the quantizer plan ({self.name})")
        return self.quantizers[module]

    def check_widths(self, in_features: dict[str, int]) -> None:
        """Every planned linear fits its quantizer; ValueError naming the first that does not."""
        for module, quantizer in self.quantizers.items():
            quantizer.check(module, in_features[module])

    def to_json(self) -> dict:
        return {"name": self.name, "linears": {m: q.spec() for m, q in self.quantizers.items()}}

    @classmethod
    def from_json(cls, doc: dict) -> QuantizerPlan:
        # One quantizer object per distinct spec, as the plan was made.
        made: dict[str, Quantizer] = {}
        quantizers = {}
        for module, spec in doc["linears"].items():
            key = repr(sorted(spec.items()))
            if key not in made:
                made[key] = quantizer_from_spec(spec)
            quantizers[module] = made[key]
        return cls(doc["name"], quantizers)
