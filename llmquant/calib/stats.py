"""Per-input-channel activation statistics of every linear in a block, gathered by hooks.

mean |x| drives AWQ's scales; mean x² is the importance that GGUF block fitting weighs errors
with (the same quantity as llama.cpp's imatrix). Inputs of selected linears can also be kept for
the first few batches, which is what scale and clip search run on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ChannelStats:
    sum_abs: torch.Tensor  # float64 [in]
    sum_sq: torch.Tensor  # float64 [in]
    n_tokens: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.n_tokens, 1)).float()

    @property
    def mean_sq(self) -> torch.Tensor:
        return (self.sum_sq / max(self.n_tokens, 1)).float()


@dataclass
class StatsCollector:
    """Forward pre-hooks on the linears of a block (paths relative to the block).

    ``keep_outputs_of`` names modules (any, e.g. ``self_attn``, ``mlp``) whose outputs are
    kept for the first ``keep_batches`` batches in ``kept_outputs``: the full-precision
    references a scale search compares its candidates with, made by the pass that runs anyway.
    """

    block: nn.Module
    keep_inputs_of: set[str] = field(default_factory=set)
    keep_batches: int = 0
    keep_outputs_of: set[str] = field(default_factory=set)
    stats: dict[str, ChannelStats] = field(default_factory=dict)
    kept: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    kept_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._handles = []
        # Linears fed the same tensor (q, k, v; gate, up) share one reduction: the last
        # input seen and its (sum |x|, sum x², tokens).
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        for name, module in self.block.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
            if name in self.keep_outputs_of:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))

    def _output_hook(self, name: str):
        def hook(_module: nn.Module, _args: tuple, out) -> None:
            kept = self.kept_outputs.setdefault(name, [])
            if len(kept) < self.keep_batches:
                kept.append((out[0] if isinstance(out, tuple) else out).detach().clone())

        return hook

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if self._last is None or self._last[0] is not args[0]:
                flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
                if flat.dtype != torch.float64:
                    flat = flat.float()
                # One batch's sums in float32 (torch sums pairwise: relative error ~1e-7 at
                # these lengths), the running totals in float64: a float64 copy of every
                # activation cost a third of a block pass.
                sums = flat.abs().sum(dim=0).double(), flat.square().sum(dim=0).double()
                self._last = (args[0], *sums, flat.shape[0])
            _, sum_abs, sum_sq, n_tokens = self._last
            entry = self.stats.get(name)
            if entry is None:
                zeros = torch.zeros(sum_abs.shape[0], dtype=torch.float64, device=x.device)
                entry = self.stats[name] = ChannelStats(zeros.clone(), zeros.clone())
            entry.sum_abs += sum_abs
            entry.sum_sq += sum_sq
            entry.n_tokens += n_tokens
            if name in self.keep_inputs_of:
                kept = self.kept.setdefault(name, [])
                if len(kept) < self.keep_batches:
                    kept.append(x.clone())

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None
