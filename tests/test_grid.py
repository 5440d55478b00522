from __future__ import annotations

import pytest
import torch

from llmquant.quant.grid import IntGrid, dequantize, fake_quant, quantize


def naive_quantize(w: torch.Tensor, grid: IntGrid):
    """Looped reference: one group at a time, plain Python arithmetic on float32 values."""
    out_f, in_f = w.shape
    size = in_f if grid.group_size == -1 else grid.group_size
    codes = torch.zeros(out_f, in_f, dtype=torch.int16)
    scales = torch.zeros(out_f, in_f // size)
    zeros = torch.zeros(out_f, in_f // size, dtype=torch.int16)
    for r in range(out_f):
        for g in range(in_f // size):
            vals = w[r, g * size : (g + 1) * size]
            if grid.symmetric:
                scale = max(vals.abs().max().item() / grid.qmax, 1e-8)
            else:
                hi, lo = max(vals.max().item(), 0.0), min(vals.min().item(), 0.0)
                scale = max((hi - lo) / grid.qmax, 1e-8)
            scale = max(float(torch.tensor(scale).half().float()), 1e-8)
            zero = 0 if grid.symmetric else min(max(round(-lo / scale), 0), grid.qmax)
            scales[r, g], zeros[r, g] = scale, zero
            for k, v in enumerate(vals.tolist()):
                q = torch.round(torch.tensor(v, dtype=torch.float32) / scale).item() + zero
                codes[r, g * size + k] = int(min(max(q, grid.qmin), grid.qmax))
    return codes, scales, zeros


GRIDS = [
    IntGrid(4, 16, False),
    IntGrid(4, 16, True),
    IntGrid(8, -1, True),
    IntGrid(3, 8, False),
    IntGrid(2, 8, True),
    IntGrid(8, 32, False),
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.describe())
def test_matches_looped_reference(grid):
    torch.manual_seed(0)
    w = torch.randn(6, 32) * 0.05
    q = quantize(w, grid)
    codes, scales, zeros = naive_quantize(w, grid)
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.scales, scales)
    if not grid.symmetric:
        assert torch.equal(q.zeros, zeros)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.describe())
def test_codes_round_trip_exactly(grid):
    """Dequantized weights re-quantize to the same codes and the same dequantized values."""
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    q = quantize(w, grid)
    w_q = dequantize(q)
    q2 = quantize(w_q, grid)
    assert torch.equal(dequantize(q2), w_q)
    assert q.codes.min() >= grid.qmin and q.codes.max() <= grid.qmax


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.describe())
def test_error_bound_half_step(grid):
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    q = quantize(w, grid)
    err = (dequantize(q) - w).abs()
    size = 64 if grid.group_size == -1 else grid.group_size
    step = q.scales.repeat_interleave(size, dim=1)
    # fp16 rounding of the scale can stretch the grid's end by one part in 2^11 of the range.
    assert bool((err <= step * 0.5 + step * grid.qmax * 2**-10 + 1e-7).all())


def test_all_zero_and_constant_groups():
    grid = IntGrid(4, 8, False)
    w = torch.zeros(3, 16)
    w[1, :8] = 0.5
    w[2, 8:] = -0.25
    q = quantize(w, grid)
    w_q = dequantize(q)
    assert torch.equal(w_q[0], w[0])  # an all-zero group stays exactly zero
    assert torch.equal(w_q[1:, :8][w[1:, :8] == 0], w[1:, :8][w[1:, :8] == 0])
    # A constant group lands on a grid end; only the fp16 rounding of its scale remains.
    assert torch.allclose(w_q, w, rtol=1e-3, atol=0)
    sym = quantize(w, IntGrid(4, 8, True))
    assert torch.allclose(dequantize(sym), w, atol=1e-3)
    assert torch.isfinite(sym.scales).all()


def test_symmetric_range_and_no_zero_point():
    grid = IntGrid(4, 8, True)
    w = torch.tensor([[1.0, -1.0, 0.5, -0.5, 0.25, 0.0, 0.75, -0.75]])
    q = quantize(w, grid)
    assert q.zeros is None
    assert q.codes.max() == 7 and q.codes.min() == -7
    assert (grid.qmin, grid.qmax) == (-8, 7)


def test_clip_shrinks_range():
    grid = IntGrid(4, 8, False)
    w = torch.linspace(-1, 1, 16).reshape(2, 8)
    clipped = fake_quant(w, grid, clip=torch.full((2, 1), 0.5))
    assert clipped.abs().max() <= 0.5 + 1e-3


def test_group_size_must_divide():
    grid = IntGrid(4, 128, False)
    with pytest.raises(ValueError, match="64"):
        quantize(torch.zeros(4, 576), grid)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        IntGrid(bits, 64, False)
