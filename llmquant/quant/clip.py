"""Clip search: shrink each group's range where that lowers the layer's output error.

Pure function of a weight, a subsample of its inputs and a quantizer. A group's contribution to
the output, x_g · w_g, is compared with its quantized version for every shrink ratio on a grid;
each (output channel, group) keeps its best ratio. The chosen clipping is then checked on the
whole layer's output and dropped if it does not lower it, so clip search never increases a
layer's loss on the data it saw.
"""

from __future__ import annotations

import torch

from llmquant.quant import grid as int_grid
from llmquant.quant.quantizers import Quantizer


def shrink_ratios(n_grid: int, max_shrink: float) -> list[float]:
    """1.0 first, then down in steps of 1/n_grid while the shrink stays below max_shrink."""
    return [1.0 - k / n_grid for k in range(max(1, int(max_shrink * n_grid)))]


def layer_loss(w_q: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared output error of ``w_q`` against ``w`` [out, in] on inputs ``x`` [n, in]."""
    return (x @ (w_q - w).T).square().mean().item()


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    quantizer: Quantizer,
    importance: torch.Tensor | None = None,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    out_batch: int = 256,
) -> tuple[torch.Tensor | None, float, float]:
    """Best clip ratios [out, n_groups] for ``w`` [out, in] on inputs ``x`` [n, in].

    Returns (ratios or None when clipping does not help, loss without clip, loss with clip).
    """
    group = quantizer.clip_group_size
    out_features, in_features = w.shape
    size = in_features if group == -1 else group
    n_groups = in_features // size
    w = w.float()
    x = x.float()
    x_groups = x.reshape(x.shape[0], n_groups, size)  # [n, n_groups, group]
    # A group's output error over the tokens, mean_n (x_g · d)², is d^T G_g d / n with G_g the
    # group's Gram matrix: the same numbers as comparing outputs, in group/n of the arithmetic.
    gram = torch.einsum("ngk,ngl->gkl", x_groups, x_groups) / x.shape[0]  # [n_groups, g, g]
    ratios = shrink_ratios(n_grid, max_shrink)
    best = torch.ones(out_features, n_groups, device=w.device)
    for start in range(0, out_features, out_batch):
        w_b = w[start : start + out_batch]
        w_groups = int_grid.group_view(w_b, size)  # [ob, n_groups, group]
        best_err = torch.full(w_groups.shape[:2], float("inf"), device=w.device)
        for ratio in ratios:
            clip = torch.full(w_groups.shape[:2], ratio, device=w.device)
            w_q = quantizer.fake_quant(w_b, importance, clip)
            delta = int_grid.group_view(w_q, size) - w_groups  # [ob, n_groups, group]
            err = (torch.einsum("ogk,gkl->ogl", delta, gram) * delta).sum(dim=-1)  # [ob, n_g]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start : start + out_batch][better] = ratio
    loss_plain = layer_loss(quantizer.fake_quant(w, importance), w, x)
    if bool((best == 1.0).all()):
        return None, loss_plain, loss_plain
    loss_clipped = layer_loss(quantizer.fake_quant(w, importance, best), w, x)
    if loss_clipped >= loss_plain:
        return None, loss_plain, loss_plain
    return best, loss_plain, loss_clipped
