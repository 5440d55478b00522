"""Mixed precision to a target size: one choice per tensor, least total error within a budget.

Each tensor has candidates (a GGML type, an int grid ...) with a size in bytes and a measured
error. The allocator minimizes the summed error subject to total bytes <= budget. It is a
multiple-choice knapsack; the method is Lagrangian relaxation (per tensor, minimize
error + λ·bytes) followed by a greedy fix-up, which is exact on most problems and always within
one tensor's hull step of the optimum, where an exact solver would be exponential or need a
byte-granular table far too large for real models (billions of bytes).

For λ the per-tensor answers are the vertices of the lower convex hull of the tensor's Pareto
front, and they change only at the slopes of its hull steps. So instead of bisecting λ over
floats, the steps of every tensor are ordered by slope (error saved per byte, steepest first)
and the budget is bisected over that order's running byte total: the taken prefix is the exact
Lagrangian solution for the λ of the first step left out, and it never exceeds the budget (so no
downgrade pass is needed). The fix-up then spends what is left on the upgrades (to any point of
a tensor's Pareto front, not only its hull) with the best error saved per byte.

Everything is ordered by explicit keys (tensor name, bytes, error, candidate name), never by
input or dict order, so a shuffled input gives the same allocation.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: ``name`` (e.g. "Q4_K"), its size, the error it causes."""

    name: str
    bytes: int
    error: float


@dataclass(frozen=True)
class Allocation:
    choices: Mapping[str, Candidate]  # tensor name -> chosen candidate, sorted by tensor name
    total_bytes: int
    total_error: float
    lagrange_multiplier: float  # error saved per byte of the first hull step left out; 0 if none
    binding: bool  # False: the budget fits every tensor's lowest-error choice


def pareto_front(options: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats, by increasing bytes (so by decreasing error).

    A candidate is dropped when another has no more bytes and no more error (same bytes and
    error: the first name is kept). Raises ValueError for a negative size, a negative or
    non-finite error, or a name given twice.
    """
    names = [c.name for c in options]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names repeat: {sorted(names)}")
    for c in options:
        if c.bytes < 0 or not (math.isfinite(c.error) and c.error >= 0):
            raise ValueError(f"candidate {c.name}: needs bytes >= 0 and a finite error >= 0: {c}")
    front: list[Candidate] = []
    for c in sorted(options, key=lambda c: (c.bytes, c.error, c.name)):
        if not front or c.error < front[-1].error:
            front.append(c)
    return front


def feasible_range(tensors: Mapping[str, Sequence[Candidate]]) -> tuple[int, int]:
    """(smallest possible total bytes, total bytes of every tensor at its lowest-error choice).

    A budget below the first is infeasible; one at or above the second is not binding.
    """
    return _range(_fronts(tensors))


def budget_from_bpw(n_weights: Mapping[str, int], bpw: float) -> int:
    """Bytes that ``bpw`` bits per weight allow over all tensors (rounded down).

    ``bpw`` is read as the decimal it is written as (4.85 is 485/100, not the float just below
    it), so a budget that comes out a whole number of bytes is not rounded one byte short.
    """
    if not (math.isfinite(bpw) and bpw > 0):
        raise ValueError(f"bits per weight must be a positive number, got {bpw}")
    if any(n < 0 for n in n_weights.values()):
        raise ValueError("a tensor cannot have a negative number of weights")
    return math.floor(Fraction(repr(bpw)) * sum(n_weights.values()) / 8)


def allocate(tensors: Mapping[str, Sequence[Candidate]], budget_bytes: int) -> Allocation:
    """One candidate per tensor with total bytes <= ``budget_bytes`` and near-least total error.

    Raises ValueError when a tensor has no candidate or when the budget is below the smallest
    possible total (the message gives the feasible range). A budget that fits every tensor's
    lowest-error choice gives exactly those, with ``binding`` False.
    """
    fronts = _fronts(tensors)
    low, high = _range(fronts)
    if budget_bytes < low:
        raise ValueError(
            f"a budget of {budget_bytes} bytes is below the smallest possible total; "
            f"feasible: {low} to {high} bytes"
        )
    if budget_bytes >= high:
        return _allocation(fronts, {t: len(f) - 1 for t, f in fronts.items()}, 0.0, False)

    # Lagrangian step: every hull step, steepest first; take the longest prefix that fits.
    hulls = {t: _hull(f) for t, f in fronts.items()}
    steps = sorted(
        (-slope, tensor, index, added)
        for tensor, front in fronts.items()
        for index, (slope, added) in enumerate(_hull_steps(front, hulls[tensor]))
    )
    spent = list(accumulate(added for *_, added in steps))
    taken = bisect_right(spent, budget_bytes - low)
    multiplier = -steps[taken][0]  # taken < len(steps): the budget is below ``high``
    hull_index = {t: 0 for t in fronts}
    for _, tensor, _, _ in steps[:taken]:
        hull_index[tensor] += 1
    position = {t: hulls[t][hull_index[t]] for t in fronts}

    # Fix-up: spend the rest on the best error saved per byte, one upgrade at a time.
    left = budget_bytes - low - (spent[taken - 1] if taken else 0)
    while True:
        best: tuple[float, str, int] | None = None
        for tensor, front in fronts.items():
            here = front[position[tensor]]
            for target in range(position[tensor] + 1, len(front)):
                extra = front[target].bytes - here.bytes
                if extra > left:
                    break  # the front is sorted by bytes
                key = (-(here.error - front[target].error) / extra, tensor, target)
                if best is None or key < best:
                    best = key
        if best is None:
            break
        _, tensor, target = best
        left -= fronts[tensor][target].bytes - fronts[tensor][position[tensor]].bytes
        position[tensor] = target
    return _allocation(fronts, position, multiplier, True)


def _fronts(tensors: Mapping[str, Sequence[Candidate]]) -> dict[str, list[Candidate]]:
    fronts = {}
    for tensor in sorted(tensors):
        if not tensors[tensor]:
            raise ValueError(f"tensor {tensor}: no candidate to choose from")
        fronts[tensor] = pareto_front(tensors[tensor])
    return fronts


def _hull(front: list[Candidate]) -> list[int]:
    """Indices into ``front`` of its lower convex hull's vertices (collinear points left out).

    A point on the hull is one some λ picks; the others are reachable only in the fix-up.
    """
    hull: list[int] = []
    for k, c in enumerate(front):
        while len(hull) >= 2:
            a, b = front[hull[-2]], front[hull[-1]]
            # b stays a vertex iff the step into it saves more per byte than the step out of it
            # (slopes cross-multiplied by the two positive byte steps).
            into_b = (a.error - b.error) * (c.bytes - b.bytes)
            out_of_b = (b.error - c.error) * (b.bytes - a.bytes)
            if into_b > out_of_b:
                break
            hull.pop()
        hull.append(k)
    return hull


def _range(fronts: dict[str, list[Candidate]]) -> tuple[int, int]:
    return sum(f[0].bytes for f in fronts.values()), sum(f[-1].bytes for f in fronts.values())


def _hull_steps(front: list[Candidate], hull: list[int]) -> list[tuple[float, int]]:
    """(error saved per byte, bytes added) of each step along the hull, steepest first."""
    vertices = [front[i] for i in hull]
    return [
        ((a.error - b.error) / (b.bytes - a.bytes), b.bytes - a.bytes)
        for a, b in zip(vertices, vertices[1:])
    ]


def _allocation(
    fronts: dict[str, list[Candidate]], position: dict[str, int], multiplier: float, binding: bool
) -> Allocation:
    choices = {t: fronts[t][position[t]] for t in sorted(fronts)}
    return Allocation(
        choices=choices,
        total_bytes=sum(c.bytes for c in choices.values()),
        total_error=math.fsum(c.error for c in choices.values()),
        lagrange_multiplier=multiplier,
        binding=binding,
    )
