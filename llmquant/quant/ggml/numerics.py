"""Float32 arithmetic exactly as ggml-quants.c does it, vectorized over blocks.

llama.cpp compiles ggml-quants.c without -ffast-math and without FMA (ggml-base gets no
-march flags), so every expression is IEEE single precision, evaluated left to right, and every
sum is a sequential loop. To produce the same bytes we mirror that: the same operand order in
each product, sums accumulated one element at a time (never torch.sum, whose pairwise order
rounds differently), ``nearest_int`` as round-half-to-even, and "first element wins" for
min/max searches so that the sign of a zero minimum matches. All functions are pure and work on
any device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

# GROUP_MAX_EPS in ggml-quants.c: below this a group counts as all zero.
GROUP_MAX_EPS = 1e-15


def f32(value: float) -> float:
    """``value`` rounded to float32, as a C ``float`` literal or expression would hold it."""
    return float(np.float32(value))


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` (the 1.5 * 2^23 trick): round half to even, kept as float32."""
    return torch.round(values)


_IN_ORDER = ContextVar("in_order_sums", default=True)
# Under search precision the fits try every SEARCH_TRIAL_STRIDE-th of their trial scales.
SEARCH_TRIAL_STRIDE = 3


@contextmanager
def search_precision() -> Iterator[None]:
    """Inside: ``seq_sum`` is torch's own sum, one kernel instead of a Python loop per element,
    and the scale fits try every third of their trial scales (:func:`trials`).

    For comparing candidates (scale and clip search), where the fit of each block only has to
    rank candidates as the exact one does; the bytes a file gets are always made outside it.
    """
    token = _IN_ORDER.set(False)
    try:
        yield
    finally:
        _IN_ORDER.reset(token)


def trials(steps: range) -> list[int]:
    """The trial steps a fit runs: all of ``steps``, in order; under :func:`search_precision`
    every SEARCH_TRIAL_STRIDE-th, the last one always kept (the grid's ends bound the range)."""
    if _IN_ORDER.get():
        return list(steps)
    kept = list(steps)[::SEARCH_TRIAL_STRIDE]
    return kept if kept[-1] == steps[-1] else [*kept, steps[-1]]


def seq_sum(terms: torch.Tensor, start_with_first: bool = False, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` in index order, as ``float acc = 0; for (...) acc += t[i];``.

    ``start_with_first`` mirrors loops that start from the first term instead of 0 (they differ
    only in the sign of a zero result). Summing over dim 0 of a contiguous tensor copies nothing.
    Under :func:`search_precision` the order is torch's (faster, not byte-exact).
    """
    if not _IN_ORDER.get():
        return terms.sum(dim=dim)
    columns = terms.movedim(dim, 0)
    if not columns.is_contiguous():
        columns = columns.contiguous()  # [n, ...]
    total = columns[0].clone() if start_with_first else torch.zeros_like(columns[0]) + columns[0]
    for column in columns[1:]:
        total = total + column
    return total


def div(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 division ``numerator / denominator`` with both sides as full tensors.

    A Python-scalar side is expanded first: torch turns ``scalar / tensor`` into
    ``reciprocal(tensor) * scalar``, and CUDA turns ``tensor / scalar`` into a multiplication by
    the reciprocal; either can differ from C's division in the last bit.
    """
    if not isinstance(denominator, torch.Tensor):
        assert isinstance(numerator, torch.Tensor)
        denominator = torch.full_like(numerator, denominator)
    if not isinstance(numerator, torch.Tensor):
        numerator = torch.full_like(denominator, numerator)
    return torch.div(numerator, denominator)


def sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf``.

    torch's float32 CPU sqrt is off by one ulp on about 15 % of inputs; the float64 root of a
    float32 rounds back to the correctly rounded float32 root.
    """
    return torch.sqrt(values.to(torch.float64)).to(torch.float32)


def first_extreme(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """The first element along the last dim equal to the max (or min): C's strict-compare scan.

    Returns the element itself, so a -0.0 that comes first is returned as -0.0.
    """
    extreme = values.amax(dim=-1, keepdim=True) if largest else values.amin(dim=-1, keepdim=True)
    first = (values == extreme).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return values.gather(-1, first).squeeze(-1)


def signed_absmax(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) of ``if (fabsf(x) > amax) { amax = fabsf(x); max = x; }`` from amax = 0."""
    magnitude = values.abs()
    amax = magnitude.amax(dim=-1, keepdim=True)
    first = (magnitude == amax).to(torch.uint8).argmax(dim=-1, keepdim=True)
    signed = values.gather(-1, first)
    # A block of zeros never enters the branch, so max keeps its initial +0.0.
    signed = torch.where(amax > 0, signed, torch.zeros_like(signed))
    return amax.squeeze(-1), signed.squeeze(-1)


def positive_max(values: torch.Tensor) -> torch.Tensor:
    """``float m = 0; for (...) if (v > m) m = v;`` over the last dim."""
    largest = values.amax(dim=-1)
    return torch.where(largest > 0, largest, torch.zeros_like(largest))


def round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: halves round away from zero (exact, unlike floor(x + 0.5))."""
    truncated = torch.trunc(values)
    step = torch.where((values - truncated).abs() >= 0.5, torch.sign(values), 0.0)
    return truncated + step


def fp16_round(values: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: round to nearest even half, back to float32."""
    return values.to(torch.float16).to(torch.float32)


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[N] float32 -> [N, 2] little-endian IEEE half bytes (uint8)."""
    halves = values.to(torch.float16).contiguous()
    return halves.view(torch.uint8).reshape(-1, 2)  # [N, 2]


def fp16_from_bytes(raw: torch.Tensor) -> torch.Tensor:
    """[N, 2] uint8 half bytes -> [N] float32."""
    return raw.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def to_byte(values: torch.Tensor) -> torch.Tensor:
    """Integer-valued float/int tensor -> uint8 with C's modulo-256 wrap for ``uint8_t x = int``."""
    return torch.bitwise_and(values.to(torch.int32), 0xFF).to(torch.uint8)


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """OR ``fields`` [..., k, m] into [..., m] bytes: field i shifted left by ``bits * i``."""
    packed = torch.zeros_like(fields[..., 0, :], dtype=torch.int32)
    for index in range(fields.shape[-2]):
        packed = packed | (fields[..., index, :].to(torch.int32) << (bits * index))
    return to_byte(packed)


def unpack_bits(raw: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """[..., m] bytes -> [..., count, m] int32 fields of ``bits`` bits, field i at bit bits * i."""
    shifts = torch.arange(count, device=raw.device, dtype=torch.int32) * bits
    fields = torch.bitwise_right_shift(raw.to(torch.int32).unsqueeze(-2), shifts[:, None])
    return torch.bitwise_and(fields, (1 << bits) - 1)  # [..., count, m]
