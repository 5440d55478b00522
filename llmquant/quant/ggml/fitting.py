"""The scale/min fitting routines of ggml-quants.c, vectorized over many small groups.

Each function takes ``x`` [N, n] (N independent groups of n values) and returns what its C
namesake returns for every group at once: ``make_qx_quants``, ``make_q3_quants``,
``make_qkx2_quants``/``make_qkx3_quants`` (one function: with weights given they are the same
algorithm) and ``make_qp_quants``. Loops over candidate scales and over the coordinate-descent
passes stay loops, because each step reads state the previous one updated; the work inside a
step is vectorized over all N groups. Operand order follows the C expressions (see numerics).

Internally the values are held transposed, [n, N]: the C sums run over the n elements in order,
and with the element index first each running sum adds contiguous rows, and per-group values
[N] broadcast without reshaping. Integer levels are float32 tensors holding whole numbers.
"""

from __future__ import annotations

import torch

from llmquant.quant.ggml.numerics import (
    GROUP_MAX_EPS,
    div,
    f32,
    first_extreme,
    nearest_int,
    positive_max,
    seq_sum,
    signed_absmax,
    trials,
)

DESCENT_PASSES = 5


def _columns(values: torch.Tensor) -> torch.Tensor:
    """[N, n] -> contiguous [n, N]."""
    return values.t().contiguous()


def _sum(terms: torch.Tensor, start_with_first: bool = False) -> torch.Tensor:
    """C's in-order sum over the elements of each group: [n, N] -> [N]."""
    return seq_sum(terms, start_with_first, dim=0)


def make_qx_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric fit with ``rmse_type == 1``: returns (scale [N], levels [N, n] in 0..2*nmax-1).

    ``weights`` defaults to x^2. The scale is the weighted least-squares one for the best of
    19 trial inverse scales -(nmax + 0.1 * k) / max, k = -9..9.
    """
    amax, signed_max = signed_absmax(x)  # [N], [N]
    all_zero = amax < GROUP_MAX_EPS
    xt = _columns(x)  # [n, N]
    wt = xt * xt if weights is None else _columns(weights)
    weighted_x = wt * xt  # w*x[i] of the C sums, before * l

    def fit(inverse_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = nearest_int(inverse_scale * xt).clamp(-nmax, nmax - 1)  # [n, N]
        return levels, _sum(weighted_x * levels), _sum(wt * levels * levels)

    levels, sum_lx, sum_l2 = fit(div(float(-nmax), signed_max))
    best_levels = levels + nmax
    scale = torch.where(sum_l2 != 0, div(sum_lx, sum_l2), 0.0)
    best = scale * sum_lx
    for step in trials(range(-9, 10)):
        if step == 0:
            continue
        trial = f32(f32(nmax) + f32(f32(0.1) * step))
        levels, sum_lx, sum_l2 = fit(div(-trial, signed_max))
        accept = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        best_levels = torch.where(accept, levels + nmax, best_levels)
        scale = torch.where(accept, div(sum_lx, sum_l2), scale)
        best = torch.where(accept, scale * sum_lx, best)
    best_levels = torch.where(all_zero, 0.0, best_levels)
    return torch.where(all_zero, 0.0, scale), best_levels.t()


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric fit with x^2 weights and coordinate descent (``do_rmse``), as Q3_K's reference.

    Returns (scale [N], levels [N, n] in 0..2*nmax-1; all-zero groups get levels 0).
    """
    amax, signed_max = signed_absmax(x)
    all_zero = amax < GROUP_MAX_EPS
    xt = _columns(x)  # [n, N]
    wt = xt * xt
    levels = nearest_int(div(float(-nmax), signed_max) * xt).clamp(-nmax, nmax - 1)
    sum_lx = _sum(wt * xt * levels)
    sum_l2 = _sum(wt * levels * levels)
    levels, sum_lx, sum_l2 = _descend(xt, wt, levels, sum_lx, sum_l2, -nmax, nmax - 1, False)
    scale = torch.where(sum_l2 > 0, div(sum_lx, sum_l2), 0.0)
    levels = torch.where(all_zero, 0.0, levels + nmax)
    return torch.where(all_zero, 0.0, scale), levels.t()


def make_qkx_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric weighted fit x ~ scale * L - the_min, L in 0..nmax (make_qkx2/qkx3_quants).

    Returns (scale [N], the_min [N] (>= 0, or -0.0), levels [N, n]). Candidates use inverse
    scales (rmin + rdelta * k + nmax) / (max - min), k = 0..nstep, each followed by a weighted
    least-squares refit of scale and min; a candidate is kept when its weighted error (|d| with
    ``use_mad``, else d^2) is strictly smaller. Later candidates start from the accepted min.
    """
    minimum = first_extreme(x, largest=False)
    maximum = first_extreme(x, largest=True)
    xt, wt = _columns(x), _columns(weights)  # [n, N]
    sum_w = _sum(wt, start_with_first=True)
    sum_x = _sum(wt * xt, start_with_first=True)
    minimum = torch.where(minimum > 0, 0.0, minimum)
    degenerate = maximum == minimum

    def quantize(inverse_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return nearest_int(inverse_scale * (xt - offset)).clamp(0, nmax)  # [n, N]

    def error(fit_scale: torch.Tensor, fit_min: torch.Tensor, levels: torch.Tensor):
        diff = fit_scale * levels + fit_min - xt
        return _sum(wt * (diff.abs() if use_mad else diff * diff))

    inverse_scale = div(float(nmax), maximum - minimum)
    scale = div(1.0, inverse_scale)
    levels = quantize(inverse_scale, minimum)
    best_error = error(scale, minimum, levels)
    for step in trials(range(nstep + 1)):
        trial = f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + f32(nmax))
        trial_levels = quantize(div(trial, maximum - minimum), minimum)
        weighted_levels = wt * trial_levels
        sum_l = _sum(weighted_levels)
        sum_l2 = _sum(weighted_levels * trial_levels)
        sum_xl = _sum(weighted_levels * xt)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = div(sum_w * sum_xl - sum_x * sum_l, det)
        trial_min = div(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive_min = trial_min > 0
        trial_min = torch.where(positive_min, 0.0, trial_min)
        trial_scale = torch.where(positive_min, div(sum_xl, sum_l2), trial_scale)
        trial_error = error(trial_scale, trial_min, trial_levels)
        accept = (det > 0) & (trial_error < best_error) & ~degenerate
        levels = torch.where(accept, trial_levels, levels)
        best_error = torch.where(accept, trial_error, best_error)
        scale = torch.where(accept, trial_scale, scale)
        minimum = torch.where(accept, trial_min, minimum)
    levels = torch.where(degenerate, 0.0, levels)
    return torch.where(degenerate, 0.0, scale), -minimum, levels.t()


def make_qp_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit of non-negative values (sub-block scales or mins) on 0..nmax with ``weights``.

    Returns (scale [N], levels [N, n]); levels are what C stores in its ``uint8_t L[]``.
    """
    maximum = positive_max(x)
    all_zero = maximum < GROUP_MAX_EPS
    xt, wt = _columns(x), _columns(weights)  # [n, N]
    inverse_scale = div(float(nmax), maximum)
    scale = div(1.0, inverse_scale)
    diff = xt - scale * _as_uint8(nearest_int(inverse_scale * xt))
    best_mse = _sum(wt * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = div(f32(f32(f32(0.1) * step) + f32(nmax)), maximum)
        diff = xt - div(1.0, trial) * nearest_int(trial * xt).clamp(max=nmax)
        mse = _sum(wt * diff * diff)
        accept = mse < best_mse
        best_mse = torch.where(accept, mse, best_mse)
        inverse_scale = torch.where(accept, trial, inverse_scale)
    levels = nearest_int(inverse_scale * xt).clamp(max=nmax)
    sum_lx = _sum(wt * xt * levels)
    sum_l2 = _sum(wt * levels * levels)
    stored, sum_lx, sum_l2 = _descend(xt, wt, _as_uint8(levels), sum_lx, sum_l2, None, nmax, True)
    scale = torch.where(sum_l2 > 0, div(sum_lx, sum_l2), 0.0)
    stored = torch.where(all_zero, 0.0, stored)
    return torch.where(all_zero, 0.0, scale), stored.t()


def _as_uint8(levels: torch.Tensor) -> torch.Tensor:
    """The value a C ``uint8_t`` holds after ``= (int)level`` (wraps negatives), as float32."""
    return torch.remainder(levels, 256.0)


def _descend(
    xt: torch.Tensor,
    wt: torch.Tensor,
    levels: torch.Tensor,
    sum_lx: torch.Tensor,
    sum_l2: torch.Tensor,
    low: int | None,
    high: int,
    qp_variant: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinate descent on the levels [n, N], maximizing sum_lx^2 / sum_l2 (explained energy).

    Element by element, in order, a level moves to round(x * sl2 / slx) of the sums without it,
    when that improves the ratio; up to five passes. A group whose pass changed nothing is at a
    fixed point, so running every group for the same passes gives the C result. ``qp_variant``
    is make_qp_quants' form (requires sl2 > 0 before, stores levels as uint8), otherwise
    make_q3_quants' (requires sl2 > 0 after, levels clamped to [low, high]).
    """
    levels = levels.clone()
    weighted_x = wt * xt
    for _ in range(DESCENT_PASSES):
        changed = torch.zeros_like(sum_lx, dtype=torch.bool)
        for i in range(xt.shape[0]):
            current, w_i, wx_i = levels[i], wt[i], weighted_x[i]
            slx = sum_lx - wx_i * current
            sl2 = sum_l2 - w_i * current * current
            movable = (slx > 0) & (sl2 > 0) if qp_variant else slx > 0
            new_level = nearest_int(div(xt[i] * sl2, slx)).clamp(min=low, max=high)
            movable = movable & (new_level != current)
            slx = slx + wx_i * new_level
            sl2 = sl2 + w_i * new_level * new_level
            better = slx * slx * sum_l2 > sum_lx * sum_lx * sl2
            accept = movable & better if qp_variant else movable & (sl2 > 0) & better
            levels[i] = torch.where(
                accept, _as_uint8(new_level) if qp_variant else new_level, current
            )
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
            changed |= accept
        if not bool(changed.any()):
            break
    return levels, sum_lx, sum_l2
