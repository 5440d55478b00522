"""Perplexity from logits: per-token negative log-likelihood, its mean and standard error."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of each predicted token: logits [b, s, V], ids [b, s] -> [b, s - 1] (float64)."""
    logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [b, s-1, V]
    return -logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [b, s-1]


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token
    nll_se: float  # standard error of that mean
    ppl_se: float  # first-order standard error of the perplexity
    n_tokens: int
    window_nll: list[float]  # mean NLL of each window

    def as_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "ppl_se": self.ppl_se,
            "nll": self.nll,
            "nll_se": self.nll_se,
            "n_tokens": self.n_tokens,
            "window_nll": self.window_nll,
        }


def summarize(nll: torch.Tensor) -> PerplexityResult:
    """Perplexity of per-token NLL [n_windows, tokens]: exp(mean) with its standard error."""
    flat = nll.reshape(-1).double()  # [n_tokens]
    n = flat.numel()
    mean = flat.mean().item()
    se = flat.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return PerplexityResult(
        ppl=ppl,
        nll=mean,
        nll_se=se,
        ppl_se=ppl * se,
        n_tokens=n,
        window_nll=nll.double().mean(dim=1).tolist(),
    )


@torch.no_grad()
def perplexity_from_hidden(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    hidden_batches: list[torch.Tensor],
    windows: torch.Tensor,
) -> PerplexityResult:
    """Perplexity of the last hidden states (batches of [b, s, h]) of ``windows`` [n, s]."""
    nll_rows = []
    start = 0
    for hidden in hidden_batches:
        ids = windows[start : start + hidden.shape[0]]
        for row in range(hidden.shape[0]):  # one window at a time bounds the [s, V] logits
            logits = logits_fn(hidden[row : row + 1])
            nll_rows.append(token_nll(logits, ids[row : row + 1]))
        start += hidden.shape[0]
    return summarize(torch.cat(nll_rows, dim=0))
