"""Activation-aware scale search (AWQ): pure functions returning per-input-channel scales.

For a scale group (previous op -> linears it feeds, inspected module), candidate scales are
s = x̄^α (divided by w̄^(1-α) with duo scaling), normalised by sqrt(max·min). Each candidate
quantizes W·diag(s) with the target quantizer, divides the scales back out and runs the inspected
module on the captured inputs; the α with the lowest output MSE against full precision wins.
s = 1 (plain round-to-nearest) is always a candidate, so the search never returns scales that
do worse than RTN on the data it saw. Folding is a separate step (``fold_scales``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmquant.quant import grid as int_grid
from llmquant.quant.quantizers import Quantizer


@dataclass
class ScaleSearchResult:
    scales: torch.Tensor  # [in]
    alpha: float | None  # None when plain RTN (s = 1) was best
    loss_rtn: float
    loss_best: float


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's absmax: [in]."""
    w = torch.cat([wt.float() for wt in weights], dim=0)  # [sum_out, in]
    size = w.shape[1] if group_size == -1 else group_size
    groups = int_grid.group_view(w.abs(), size)  # [sum_out, n_groups, group]
    groups = groups / (groups.amax(dim=-1, keepdim=True) + 1e-6)
    return groups.reshape(w.shape).mean(dim=0)  # [in]


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """AWQ scales for one α: x̄^α, or x̄^α / w̄^(1-α) (duo scaling), geometric-mean normalised."""
    x_mean = x_mean.float().clamp(min=1e-8)
    if w_mean is None:
        scales = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        scales = (x_mean.pow(alpha) / (w_mean.float().pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def mse(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for out, ref in zip(outputs, references):
        total += (out.float() - ref.float()).square().sum().item()
        count += ref.numel()
    return total / max(count, 1)


def refined_grid_order(n_grid: int) -> list[list[int]]:
    """The α indices (α = k / n_grid) a refined search evaluates, round by round.

    Round one spans the grid at a coarse stride (a power of two, about n_grid / 4); each later
    round halves the stride and looks on both sides of the best index so far, which the search
    fills in (hence the ``-1`` placeholders: offsets, not indices). A loss curve that is
    unimodal at the coarse stride gets the full grid's answer in about half the evaluations.
    """
    stride = 1
    while stride * 2 <= n_grid / 4:
        stride *= 2
    rounds = [list(range(0, n_grid, stride))]
    while stride > 1:
        stride //= 2
        rounds.append([-stride, stride])
    return rounds


@torch.no_grad()
def search_scales(
    linears: list[nn.Linear],
    inputs: list[torch.Tensor],
    run_inspect: Callable[[torch.Tensor], torch.Tensor],
    x_mean: torch.Tensor,
    quantizers: list[Quantizer],
    importance: torch.Tensor | None = None,
    n_grid: int = 20,
    duo_scaling: bool = True,
    refine: bool = False,
    references: list[torch.Tensor] | None = None,
) -> ScaleSearchResult:
    """Search α for one scale group; leaves the linears' weights as they were.

    ``quantizers[i]`` quantizes ``linears[i]`` (a GGUF mix may give a group's linears different
    types; each is searched under its own). ``refine`` evaluates the α grid coarse to fine
    (:func:`refined_grid_order`) instead of every point. When the inspected module is the one
    linear itself and it has fewer input features than there are tokens, its output error is
    computed from the inputs' Gram matrix: exactly the same loss, in in/tokens of the arithmetic
    per candidate (out x in x in instead of tokens x in x out). ``references``: the inspected
    module's full-precision outputs for ``inputs`` when the caller already has them.
    """
    originals = [lin.weight.data.clone() for lin in linears]
    group_size = quantizers[0].clip_group_size
    w_mean = weight_mean(originals, group_size) if duo_scaling else None
    gram = None
    n_tokens = sum(x.numel() // x.shape[-1] for x in inputs)
    if len(linears) == 1 and run_inspect is linears[0] and linears[0].in_features < n_tokens:
        flat = torch.cat([x.reshape(-1, x.shape[-1]).float() for x in inputs])  # [tokens, in]
        gram = (flat.T @ flat, flat.shape[0])
    elif references is None:
        references = [run_inspect(x) for x in inputs]

    def loss_for(scales: torch.Tensor) -> float:
        imp = None if importance is None else importance / scales.square()
        if gram is not None:
            w = originals[0]
            delta = (quantizers[0].fake_quant(w * scales, imp) / scales).float() - w.float()
            return ((delta @ gram[0]) * delta).sum().item() / (gram[1] * w.shape[0])
        for lin, w, quantizer in zip(linears, originals, quantizers):
            # Quantize W·diag(s), then divide s back out: the module sees the same inputs.
            lin.weight.data = (quantizer.fake_quant(w * scales, imp) / scales).to(w.dtype)
        try:
            return mse([run_inspect(x) for x in inputs], references)
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w

    ones = torch.ones_like(x_mean, dtype=torch.float32)
    loss_rtn = loss_for(ones)
    losses: dict[int, float] = {}

    def evaluate(step: int) -> None:
        if 0 <= step < n_grid and step not in losses:
            losses[step] = loss_for(candidate_scales(x_mean, w_mean, step / n_grid))

    if refine:
        rounds = refined_grid_order(n_grid)
        for step in rounds[0]:
            evaluate(step)
        for offsets in rounds[1:]:
            centre = min(losses, key=lambda k: (losses[k], k))
            for offset in offsets:
                evaluate(centre + offset)
    else:
        for step in range(n_grid):
            evaluate(step)
    best = ScaleSearchResult(ones, None, loss_rtn, loss_rtn)
    for step in sorted(losses):
        if losses[step] < best.loss_best:
            alpha = step / n_grid
            best = ScaleSearchResult(
                candidate_scales(x_mean, w_mean, alpha), alpha, loss_rtn, losses[step]
            )
    return best


@torch.no_grad()
def fold_scales(
    prev: nn.Module,
    linears: list[nn.Linear],
    scales: torch.Tensor,
    norm_plus_one: bool = False,
    prev_rows: tuple[int, int] | None = None,
) -> None:
    """Divide ``prev``'s output by ``scales`` and multiply the linears' inputs by them.

    The full-precision function is unchanged: norm weight (or previous linear rows) / s, and
    linear columns * s. ``prev_rows`` (chunk, n_chunks) selects a fused linear's output rows.
    """
    scales = scales.to(linears[0].weight.dtype)
    if isinstance(prev, nn.Linear):
        rows = slice(None)
        if prev_rows is not None:
            chunk, n_chunks = prev_rows
            width = prev.out_features // n_chunks
            rows = slice(chunk * width, (chunk + 1) * width)
        prev.weight.data[rows] = prev.weight.data[rows] / scales.unsqueeze(1)
        if prev.bias is not None:
            prev.bias.data[rows] = prev.bias.data[rows] / scales
    else:
        weight = prev.weight.data
        if norm_plus_one:
            prev.weight.data = (1.0 + weight) / scales - 1.0
        else:
            prev.weight.data = weight / scales
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = bias.data / scales
    for lin in linears:
        lin.weight.data = lin.weight.data * scales.unsqueeze(0)
