"""What an error at each block's output costs at the model's output: one gain per block.

A size target's candidate errors are measured at their own block's output, relative to each
token (``calib.block``). The same relative error does not cost the same everywhere: on Gemma-3
an error at the first block's output moves the model's KL divergence about 20 x less than the
same relative error at later blocks' (eval/results/proxy_vs_kld.md), and an allocation that
sums the raw errors spends its bits on the first block. So each block's output is perturbed
once on the candidate errors' tokens, by seeded noise in the weights of its allocated linears
shaped like quantization error (each row's RMS times ``NOISE``), the perturbation is carried
through every later block at full precision, and the KL divergence of the model's next-token
distributions from full precision's, divided by the perturbation's own relative error at the
block, is the block's gain. The allocation multiplies the block's candidate errors by it, so
they add up to a first-order estimate of the whole model's KLD.

Noise instead of one of the candidate types: the gain should not depend on the types (a
weight already on a type's grid, as in a dequantized GGUF, has no error under it to carry).
Every perturbation rides on the same full-precision stream, so the cost is one window through
each block per earlier block (a triangle of block runs, on ``awq.clip_n_tokens`` tokens).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from llmquant.calib.block import in_float32, relative_token_weight

log = logging.getLogger(__name__)

# The weight noise, relative to each row's RMS: about a 5-bit grid's rounding error, small
# enough that the model's response is in its quadratic (first-order in the error) range.
NOISE = 0.05


def relative_error(delta: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over tokens of ||δ_t||² / ||y_t||² ([..., hidden] x2): the candidate errors' measure."""
    return float((delta.square().sum(-1) * relative_token_weight(reference)).mean())


class DownstreamGain:
    """Carries one perturbation per block along the full-precision stream of ``window``
    [windows, seq, hidden] (block 0's inputs), block by block; ``gains`` after the last."""

    def __init__(self, window: torch.Tensor, seed: int = 0) -> None:
        self.stream = window.float()
        self.seed = seed
        self.perturbations: dict[int, torch.Tensor] = {}  # block -> its perturbation, carried
        self.relative: dict[int, float] = {}  # block -> the perturbation's error at that block

    @torch.no_grad()
    def step(self, index: int, block: nn.Module, kwargs: dict, linears: list[nn.Linear]) -> None:
        """Carry the earlier perturbations through ``block`` (full precision, as loaded) and add
        its own from noise in ``linears`` (none: the block gets no gain). Leaves ``block`` as
        it was."""
        with in_float32(block, kwargs) as run:
            y = run(self.stream)
            x = self.stream.to(y.device)
            for k, delta in self.perturbations.items():
                self.perturbations[k] = run(x + delta.to(y.device)) - y
            if linears:
                self._perturb(index, linears, run, y)
        self.stream = y

    def _perturb(self, index: int, linears: list[nn.Linear], run, y: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        originals = [m.weight.data for m in linears]
        try:
            for m in linears:
                w = m.weight.data
                rms = w.square().mean(dim=1, keepdim=True).sqrt()  # [out, 1]
                noise = torch.randn(w.shape, generator=generator).to(w.device)
                m.weight.data = w + NOISE * rms * noise
            delta = run(self.stream.to(y.device)) - y
        finally:
            for m, w in zip(linears, originals, strict=True):
                m.weight.data = w
        relative = relative_error(delta, y)
        if relative > 0:
            self.perturbations[index] = delta
            self.relative[index] = relative

    @torch.no_grad()
    def gains(
        self, logits: Callable[[torch.Tensor], torch.Tensor], chunk: int = 128
    ) -> dict[int, float]:
        """Block -> mean KL(full precision || perturbed) of the next-token distributions over
        the perturbation's relative error at the block. ``logits`` maps hidden states
        [1, n, hidden] after the last block to logits [1, n, V]. Tokens go ``chunk`` at a time
        (a 262k vocabulary makes a window's logits a gigabyte), in float32: with d the change
        of the logits, centred under the full-precision distribution p, KL(p || q) =
        log(1 + Σ p (e^d - 1)), which keeps the small divergences without the cancellation of
        subtracting two log-probabilities (``token_kld`` needs float64 for that, 6 x the time)."""
        totals = dict.fromkeys(self.perturbations, 0.0)
        windows, seq = self.stream.shape[:2]
        for w in range(windows):
            for start in range(0, seq - 1, chunk):
                stop = min(start + chunk, seq - 1) + 1  # one more: the last position predicts none
                hidden = self.stream[w : w + 1, start:stop]  # [1, n, hidden]
                base = logits(hidden).float()[:, :-1]  # [1, n-1, V]
                probs = torch.softmax(base, dim=-1)
                for k, delta in self.perturbations.items():
                    moved = logits(hidden + delta[w : w + 1, start:stop].to(hidden.device))
                    totals[k] += float(kld_float32(base, probs, moved.float()[:, :-1]).sum())
        scored = windows * (seq - 1)
        return {k: totals[k] / scored / self.relative[k] for k in sorted(totals)}


def kld_float32(base: torch.Tensor, probs: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from float32 logits [..., V]: ``base`` (p's), ``probs``
    (softmax of ``base``) and ``moved`` (q's) -> [...]."""
    d = moved - base
    d = d - (probs * d).sum(dim=-1, keepdim=True)  # centred: Σ p d = 0
    return torch.log1p((probs * torch.expm1(d)).sum(dim=-1))


def for_measured_tokens(
    batches: list[torch.Tensor], n_tokens: int, measured: dict
) -> DownstreamGain | None:
    """The gains' carrier on the windows ``calib.block`` measures candidate errors on (the
    first ones of the first batch holding ``n_tokens``), or None without candidates."""
    if not measured or not batches:
        return None
    windows = max(1, -(-n_tokens // batches[0].shape[1]))
    return DownstreamGain(batches[0][:windows].clone())


def with_gains(block_info: list[dict], gains: dict[int, float]) -> None:
    """Each block's ``downstream_gain`` in its info; a block with candidate errors but no gain
    of its own (its perturbation vanished) gets the median of the others, so every block's
    errors are in the same units. A gain that is not a finite positive number (a perturbation
    that overflowed) counts as missing."""
    dropped = sorted(k for k, g in gains.items() if not (math.isfinite(g) and g > 0))
    if dropped:
        log.warning("blocks %s: downstream gain not finite; they get the median", dropped)
    gains = {k: g for k, g in gains.items() if k not in dropped}
    if not gains:
        return
    median = float(torch.tensor(list(gains.values())).median())
    for info in block_info:
        if info["block"] in gains:
            info["downstream_gain"] = gains[info["block"]]
        elif info.get("candidate_errors"):
            info["downstream_gain"] = median
