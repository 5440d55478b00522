"""The non-linear 4-bit types: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

Both store 4-bit indices into the fixed table ``kvalues_iq4nl`` of 16 signed levels; a weight
is ``scale * table[index]``. IQ4_NL has one fp16 scale per 32 weights; IQ4_XS one fp16 ``d`` per
256 and a 6-bit signed multiplier (stored + 32) per sub-block of 32. The quantizer is
``quantize_iq4_nl`` / ``quantize_iq4_xs`` of ggml-quants.c (what llama-quantize and
``ggml_quantize_chunk`` run, with or without an imatrix): per group of 32 an initial scale
from the signed value of largest magnitude, then 15 trial inverse scales (k - 127) / max,
k = -7..7, each rounded to the nearest table entry and refitted by weighted least squares, the
best kept by explained energy sumqx^2 / sumq2. Weights are x^2, or with importance
qw * sqrt(sigma2 + x^2), sigma2 being twice the mean x^2 of the (super-)block.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGMLQuantizationType

from llmquant.quant.ggml.base import GGMLType
from llmquant.quant.ggml.numerics import (
    GROUP_MAX_EPS,
    div,
    fp16_bytes,
    fp16_from_bytes,
    nearest_int,
    pack_bits,
    seq_sum,
    signed_absmax,
    sqrt,
    trials,
    unpack_bits,
)
from llmquant.quant.ggml.superblock import QK_K

# kvalues_iq4nl of ggml-common.h: the 16 levels, ascending.
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# Trial inverse scales on each side of the first guess: quantize_iq4_{nl,xs} pass ntry = 7.
TRIALS = 7


@functools.cache
def _lookup_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, level) of the nearest table entry for each half step floor(2x), x in -127..113.

    Entry k is for floor(2x) = 2 * -127 + k: the index is how many midpoints lower + upper of
    adjacent levels (doubled, so whole numbers) lie at or below it.
    """
    low, high = 2 * KVALUES_IQ4NL[0], 2 * KVALUES_IQ4NL[-1]
    doubled_mids = [a + b for a, b in zip(KVALUES_IQ4NL, KVALUES_IQ4NL[1:])]
    index = [sum(m <= k for m in doubled_mids) for k in range(low, high + 1)]
    index_table = torch.tensor(index, dtype=torch.int64, device=device)
    levels = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)
    return index_table, levels[index_table]


def _half_steps(values: torch.Tensor) -> torch.Tensor:
    """Positions into the lookup tables: floor(2x) clamped to the table's range, int64.

    fmin first so that NaN lands on the last entry, where the C search leaves it.
    """
    low, high = 2 * KVALUES_IQ4NL[0], 2 * KVALUES_IQ4NL[-1]
    doubled = torch.floor(values * 2.0)
    doubled = torch.fmin(doubled, torch.full_like(doubled, high)).clamp(min=low)
    return (doubled - low).long()


def best_index(values: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8`` over the table: the nearest level's index (int64).

    C compares ``x - lower < upper - x`` in float32 (ties go up). Both differences are exact
    wherever they could tie: a tie needs x within 2^-19 of a midpoint, all midpoints are at
    least 4.5 in magnitude and the differences below 16, so both are multiples of ulp(x) that
    fit 24 bits. The comparison is then x < (lower + upper) / 2 exactly, i.e. a count of the
    midpoints at or below x, which depends only on floor(2x) as every midpoint is a multiple
    of 1/2. Below the first level this is 0, above the last 15.
    """
    index_table, _ = _lookup_tables(values.device)
    return index_table[_half_steps(values)]


def nearest_level(values: torch.Tensor) -> torch.Tensor:
    """The table level at ``best_index(values)``, float32."""
    _, level_table = _lookup_tables(values.device)
    return level_table[_half_steps(values)]


def importance_weights(blocks: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """qw * sqrt(sigma2 + x^2), sigma2 = sum(x^2) * (2 / n) over each (super-)block [N, n]."""
    sigma2 = seq_sum(blocks * blocks) * (2.0 / blocks.shape[1])  # [N]; 2/n is a power of two
    return importance * sqrt(sigma2[:, None] + blocks * blocks)


def fit_scales(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The scale of each group of 32 [N, 32] -> [N]: the first loop of quantize_row_iq4_nl_impl.

    Groups whose largest magnitude is below GROUP_MAX_EPS get scale 0. Held transposed, [32, N],
    so the in-order sums over a group add contiguous rows.
    """
    amax, signed_max = signed_absmax(x)  # [N], [N]
    xt, wt = x.t().contiguous(), weights.t().contiguous()  # [32, N]

    def sums(inverse_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = nearest_level(inverse_scale * xt)  # [32, N]
        wq = wt * q
        return seq_sum(wq * xt, dim=0), seq_sum(wq * q, dim=0)

    # ``d = -max / values[0]; id = 1 / d``
    sum_qx, sum_q2 = sums(div(1.0, div(-signed_max, float(KVALUES_IQ4NL[0]))))
    scale = torch.where(sum_q2 > 0, div(sum_qx, sum_q2), 0.0)
    best = scale * sum_qx
    for step in trials(range(-TRIALS, TRIALS + 1)):
        sum_qx, sum_q2 = sums(div(float(step + KVALUES_IQ4NL[0]), signed_max))
        accept = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
        scale = torch.where(accept, div(sum_qx, sum_q2), scale)
        best = torch.where(accept, scale * sum_qx, best)
    return torch.where(amax < GROUP_MAX_EPS, 0.0, scale)


def _inverse(step: torch.Tensor) -> torch.Tensor:
    """``step ? 1 / step : 0``."""
    return torch.where(step != 0, div(1.0, step), 0.0)


def _pack_indices(indices: torch.Tensor) -> torch.Tensor:
    """[N, 32 * k] indices -> [N, 16 * k]: per 32, byte j holds j (low nibble) and 16 + j."""
    groups = indices.reshape(-1, 2, 16)  # [N * k, half, 16]
    return pack_bits(groups, 4).reshape(indices.shape[0], -1)


def _unpack_levels(raw: torch.Tensor) -> torch.Tensor:
    """[N, 16 * k] bytes -> [N, 32 * k] float32 table levels in element order."""
    nibbles = unpack_bits(raw.reshape(-1, 16), 4, 2)  # [N * k, half, 16]
    levels = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=raw.device)
    return levels[nibbles.reshape(raw.shape[0], -1).long()]


class IQ4_NL(GGMLType):
    """32 weights: x = d * table[q], one fp16 d, 4-bit q."""

    name = "IQ4_NL"
    type_id = GGMLQuantizationType.IQ4_NL
    block_size, type_size, clip_group_size = 32, 18, 32

    def _encode_blocks(self, blocks, weights, rows):
        fit_weights = blocks * blocks if weights is None else importance_weights(blocks, weights)
        scale = fit_scales(blocks, fit_weights)  # [N]
        indices = best_index(_inverse(scale)[:, None] * blocks)  # [N, 32]
        return torch.cat([fp16_bytes(scale), _pack_indices(indices)], dim=-1)

    def _decode_blocks(self, raw):
        d = fp16_from_bytes(raw[:, :2])
        return d[:, None] * _unpack_levels(raw[:, 2:])


def _pack_sub_scales(codes: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit codes [N, 8] -> scales_h (uint16, 2 bits per sub-block) + scales_l [N, 6].

    scales_h bits 2i..2i+1 hold the top bits of code i; scales_l byte k holds the low nibbles
    of codes 2k (low) and 2k + 1 (high).
    """
    codes = codes.to(torch.int32)
    high = pack_bits((codes >> 4).reshape(-1, 2, 4).transpose(1, 2), 2)  # [N, 2] little-endian
    low = pack_bits((codes & 0xF).reshape(-1, 4, 2).transpose(1, 2), 4)  # [N, 4]
    return torch.cat([high, low], dim=-1)


def _unpack_sub_scales(raw: torch.Tensor) -> torch.Tensor:
    """scales_h + scales_l [N, 6] -> the eight signed multipliers (code - 32) [N, 8] int32."""
    high = unpack_bits(raw[:, :2], 2, 4).transpose(1, 2).reshape(-1, 8)  # [N, 8]
    low = unpack_bits(raw[:, 2:6], 4, 2).transpose(1, 2).reshape(-1, 8)
    return (low | (high << 4)) - 32


class IQ4_XS(GGMLType):
    """256 weights, 8 sub-blocks of 32: x = d * (code_j - 32) * table[q], 6-bit code_j."""

    name = "IQ4_XS"
    type_id = GGMLQuantizationType.IQ4_XS
    block_size, type_size, clip_group_size = QK_K, 136, 32

    def _encode_blocks(self, blocks, weights, rows):
        fit_weights = blocks * blocks if weights is None else importance_weights(blocks, weights)
        sub = blocks.reshape(-1, 32)  # [N * 8, 32]
        scales = fit_scales(sub, fit_weights.reshape(-1, 32)).reshape(-1, 8)  # [N, 8]
        _, max_scale = signed_absmax(scales)
        d = div(-max_scale, 32.0)  # [N]; its fp16 is stored, the float32 requantizes
        multipliers = nearest_int(_inverse(d)[:, None] * scales).clamp(-32, 31)  # [N, 8]
        step = d[:, None] * multipliers
        x = blocks.reshape(-1, 8, 32)  # [N, 8, 32]
        indices = best_index(_inverse(step)[..., None] * x).reshape(-1, QK_K)
        scale_bytes = _pack_sub_scales(multipliers + 32)
        return torch.cat([fp16_bytes(d), scale_bytes, _pack_indices(indices)], dim=-1)

    def _decode_blocks(self, raw):
        d = fp16_from_bytes(raw[:, :2])
        step = d[:, None] * _unpack_sub_scales(raw[:, 2:8]).to(torch.float32)  # [N, 8]
        levels = _unpack_levels(raw[:, 8:]).reshape(-1, 8, 32)
        return (step[..., None] * levels).reshape(-1, QK_K)
