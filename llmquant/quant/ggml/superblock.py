"""Pieces shared by the K-quant types: imatrix weighting, requantization, 2-bit packing."""

from __future__ import annotations

import torch

from llmquant.quant.ggml.numerics import div, nearest_int, pack_bits, seq_sum, sqrt, unpack_bits

QK_K = 256


def imatrix_weights(blocks: torch.Tensor, importance: torch.Tensor, factor: float) -> torch.Tensor:
    """qw[j] * sqrt(sigma2 + x[j]^2) with sigma2 = factor * sum(x^2) / 256 over each super-block.

    ``blocks`` and ``importance`` [N, 256]; Q2_K uses factor 1, Q3_K/Q4_K/Q5_K factor 2.
    """
    sigma2 = div(factor * seq_sum(blocks * blocks), float(QK_K))  # [N]
    return importance * sqrt(sigma2[:, None] + blocks * blocks)


def requantize(
    blocks: torch.Tensor,
    levels: torch.Tensor,
    step: torch.Tensor,
    offset: torch.Tensor | None,
    low: int,
    high: int,
) -> torch.Tensor:
    """Levels round((x + offset) / step) clamped to [low, high], from the *stored* scales.

    ``blocks``/``levels`` [N, n_sub, sub], ``step``/``offset`` [N, n_sub]. A sub-block whose
    step is 0 keeps the fit's levels, as the C loop ``if (!d) continue;`` does.
    """
    shifted = blocks if offset is None else blocks + offset[..., None]
    requantized = nearest_int(div(shifted, step[..., None].expand_as(shifted))).clamp(low, high)
    return torch.where((step != 0)[..., None], requantized, levels)


def pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """[N, 256] 2-bit levels -> [N, 64]; byte 32h + t holds element 128h + 32j + t at bits 2j."""
    return pack_bits(levels.reshape(-1, 2, 4, 32), 2).reshape(-1, 64)


def unpack_2bit(raw: torch.Tensor) -> torch.Tensor:
    """[N, 64] bytes -> [N, 256] int32 2-bit levels in element order."""
    return unpack_bits(raw.reshape(-1, 2, 32), 2, 4).reshape(-1, QK_K)
