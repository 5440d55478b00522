"""Comparison metrics of a model against a baseline on identical windows: pure tensor functions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llmquant.evaluate.perplexity import summarize, token_nll


def token_kld(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || model) of each next-token distribution: [b, s, V] x2 -> [b, s - 1] (float64)."""
    base = torch.log_softmax(base_logits[:, :-1].double(), dim=-1)  # [b, s-1, V]
    model = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return (base.exp() * (base - model)).sum(dim=-1).clamp(min=0.0)  # [b, s-1]


def top1_agreement(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both put the most probability on the same next token: [b, s - 1]."""
    return (base_logits[:, :-1].argmax(-1) == logits[:, :-1].argmax(-1)).double()


@dataclass
class Accumulator:
    """Per-token values of one model, gathered window by window."""

    nll: list[torch.Tensor] = field(default_factory=list)  # each [1, s-1]
    kld: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)

    def add(self, logits: torch.Tensor, ids: torch.Tensor, base_logits: torch.Tensor | None):
        self.nll.append(token_nll(logits, ids))
        if base_logits is not None:
            self.kld.append(token_kld(base_logits, logits))
            self.top1.append(top1_agreement(base_logits, logits))

    def summary(self) -> dict:
        ppl = summarize(torch.cat(self.nll, dim=0))
        out = {
            "ppl": ppl.ppl,
            "ppl_se": ppl.ppl_se,
            "nll": ppl.nll,
            "n_tokens": ppl.n_tokens,
            "window_nll": ppl.window_nll,
        }
        if self.kld:
            kld = torch.cat(self.kld, dim=0)  # [n_windows, s-1]
            flat = kld.reshape(-1)
            out.update(
                {
                    "kld_mean": flat.mean().item(),
                    "kld_se": flat.std().item() / math.sqrt(flat.numel()),
                    "kld_median": flat.median().item(),
                    "kld_p99": torch.quantile(flat, 0.99).item(),
                    "top1_agreement": torch.cat(self.top1).mean().item(),
                    "window_kld": kld.mean(dim=1).tolist(),
                }
            )
        return out
