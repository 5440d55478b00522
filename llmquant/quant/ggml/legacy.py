"""Float types and the legacy 32-wide block types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Without importance each quantizer is the ``quantize_row_*_ref`` of ggml-quants.c (and so equal
to gguf-py's ``gguf.quants.quantize``); with importance it is ``quantize_row_*_impl``, which
llama-quantize runs when given an imatrix. Q8_0 and the float types ignore importance, as
llama.cpp does.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from llmquant.quant.ggml.base import GGMLType, row_sigma2
from llmquant.quant.ggml.fitting import make_qkx_quants, make_qx_quants
from llmquant.quant.ggml.numerics import (
    div,
    first_extreme,
    fp16_bytes,
    fp16_from_bytes,
    pack_bits,
    round_half_away,
    signed_absmax,
    sqrt,
    to_byte,
    unpack_bits,
)


class F32(GGMLType):
    name = "F32"
    type_id = GGMLQuantizationType.F32
    block_size, type_size, clip_group_size = 1, 4, 32
    uses_importance = False

    def _encode_blocks(self, blocks, weights, rows):
        return blocks.contiguous().view(torch.uint8)  # [N, 4]

    def _decode_blocks(self, raw):
        return raw.contiguous().view(torch.float32)  # [N, 1]


class F16(GGMLType):
    name = "F16"
    type_id = GGMLQuantizationType.F16
    block_size, type_size, clip_group_size = 1, 2, 32
    uses_importance = False

    def _encode_blocks(self, blocks, weights, rows):
        return blocks.to(torch.float16).contiguous().view(torch.uint8)  # [N, 2]

    def _decode_blocks(self, raw):
        return raw.contiguous().view(torch.float16).to(torch.float32)  # [N, 1]


class BF16(GGMLType):
    """Top 16 bits rounded to nearest even; NaNs made quiet (ggml_compute_fp32_to_bf16)."""

    name = "BF16"
    type_id = GGMLQuantizationType.BF16
    block_size, type_size, clip_group_size = 1, 2, 32
    uses_importance = False

    def _encode_blocks(self, blocks, weights, rows):
        bits = blocks.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [N, 1]
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        bits = torch.where(is_nan, (bits & 0xFFFF0000) | (64 << 16), bits)
        half = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return torch.cat([half & 0xFF, (half >> 8) & 0xFF], dim=-1).to(torch.uint8)  # [N, 2]

    def _decode_blocks(self, raw):
        high = raw.to(torch.int32)
        bits = (high[:, 0] | (high[:, 1] << 8)) << 16
        return bits.view(torch.float32)[:, None]  # [N, 1]


class Q8_0(GGMLType):
    name = "Q8_0"
    type_id = GGMLQuantizationType.Q8_0
    block_size, type_size, clip_group_size = 32, 34, 32
    uses_importance = False

    def _encode_blocks(self, blocks, weights, rows):
        d = div(blocks.abs().amax(dim=-1), 127.0)
        inverse = torch.where(d != 0, div(1.0, d), 0.0)
        codes = round_half_away(blocks * inverse[:, None])
        return torch.cat([fp16_bytes(d), to_byte(codes)], dim=-1)

    def _decode_blocks(self, raw):
        d = fp16_from_bytes(raw[:, :2])
        codes = raw[:, 2:].view(torch.int8).to(torch.float32)
        return codes * d[:, None]


def _pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """[N, 32] levels -> [N, 16] bytes: element j in the low nibble, j + 16 in the high one."""
    low = torch.bitwise_and(levels.to(torch.int32), 0x0F)
    return pack_bits(low.reshape(-1, 2, 16), 4)  # [N, 16]


def _unpack_nibbles(raw: torch.Tensor) -> torch.Tensor:
    """[N, 16] bytes -> [N, 32] int32 nibbles in element order."""
    return unpack_bits(raw, 4, 2).reshape(-1, 32)  # [N, 32]


def _pack_fifth_bits(levels: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 levels -> [N, 4] bytes of the little-endian uint32 ``qh``."""
    high = torch.bitwise_right_shift(levels.to(torch.int32), 4) & 1
    return pack_bits(high.reshape(-1, 4, 8).transpose(1, 2), 1)  # [N, 4]


def _unpack_fifth_bits(raw: torch.Tensor) -> torch.Tensor:
    """[N, 4] ``qh`` bytes -> [N, 32] int32 bits in element order."""
    return unpack_bits(raw, 1, 8).transpose(1, 2).reshape(-1, 32)  # [N, 32]


def _imatrix_weights(
    blocks: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """qw[j] * sqrt(sigma2 + x[j]^2) with sigma2 the mean x^2 of the block's row."""
    sigma2 = row_sigma2(rows, blocks.shape[1])  # [N]
    return weights * sqrt(sigma2[:, None] + blocks * blocks)


class _SymmetricLegacy(GGMLType):
    """Q4_0 / Q5_0: x = d * (q - 2^(bits-1)), d from the signed value of largest magnitude."""

    block_size, clip_group_size = 32, 32
    bits: int

    def _levels(self, blocks: torch.Tensor, weights, rows) -> tuple[torch.Tensor, torch.Tensor]:
        half = 1 << (self.bits - 1)
        if weights is not None:
            return make_qx_quants(blocks, half, _imatrix_weights(blocks, weights, rows))
        _, signed_max = signed_absmax(blocks)
        d = div(signed_max, float(-half))
        inverse = torch.where(d != 0, div(1.0, d), 0.0)
        levels = torch.trunc(blocks * inverse[:, None] + (half + 0.5)).clamp(max=2 * half - 1)
        return d, levels

    def _decode_blocks(self, raw):
        d = fp16_from_bytes(raw[:, :2])
        levels = self._decode_levels(raw)
        return d[:, None] * (levels - (1 << (self.bits - 1))).to(torch.float32)

    def _decode_levels(self, raw: torch.Tensor) -> torch.Tensor:
        return _unpack_nibbles(raw[:, 2:18])


class Q4_0(_SymmetricLegacy):
    name = "Q4_0"
    type_id = GGMLQuantizationType.Q4_0
    type_size, bits = 18, 4

    def _encode_blocks(self, blocks, weights, rows):
        d, levels = self._levels(blocks, weights, rows)
        return torch.cat([fp16_bytes(d), _pack_nibbles(levels)], dim=-1)


class Q5_0(_SymmetricLegacy):
    name = "Q5_0"
    type_id = GGMLQuantizationType.Q5_0
    type_size, bits = 22, 5

    def _encode_blocks(self, blocks, weights, rows):
        d, levels = self._levels(blocks, weights, rows)
        return torch.cat([fp16_bytes(d), _pack_fifth_bits(levels), _pack_nibbles(levels)], dim=-1)

    def _decode_levels(self, raw):
        return _unpack_nibbles(raw[:, 6:22]) | (_unpack_fifth_bits(raw[:, 2:6]) << 4)


class _AffineLegacy(GGMLType):
    """Q4_1 / Q5_1: x = d * q + m, with m the block minimum (or the fitted offset with imatrix)."""

    block_size, clip_group_size = 32, 32
    bits: int

    def _levels(self, blocks, weights, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top = (1 << self.bits) - 1
        if weights is not None:
            weights = _imatrix_weights(blocks, weights, rows)
            d, the_min, levels = make_qkx_quants(blocks, weights, top, -0.9, 0.05, 36, False)
            return d, -the_min, levels
        minimum = first_extreme(blocks, largest=False)
        maximum = first_extreme(blocks, largest=True)
        d = div(maximum - minimum, float(top))
        inverse = torch.where(d != 0, div(1.0, d), 0.0)
        levels = torch.trunc((blocks - minimum[:, None]) * inverse[:, None] + 0.5)
        if self.bits == 4:
            levels = levels.clamp(max=top)  # Q5_1's reference has no MIN() and needs none
        return d, minimum, levels

    def _decode_blocks(self, raw):
        d = fp16_from_bytes(raw[:, :2])
        m = fp16_from_bytes(raw[:, 2:4])
        return d[:, None] * self._decode_levels(raw).to(torch.float32) + m[:, None]

    def _decode_levels(self, raw: torch.Tensor) -> torch.Tensor:
        return _unpack_nibbles(raw[:, 4:20])


class Q4_1(_AffineLegacy):
    name = "Q4_1"
    type_id = GGMLQuantizationType.Q4_1
    type_size, bits = 20, 4

    def _encode_blocks(self, blocks, weights, rows):
        d, m, levels = self._levels(blocks, weights, rows)
        return torch.cat([fp16_bytes(d), fp16_bytes(m), _pack_nibbles(levels)], dim=-1)


class Q5_1(_AffineLegacy):
    name = "Q5_1"
    type_id = GGMLQuantizationType.Q5_1
    type_size, bits = 24, 5

    def _encode_blocks(self, blocks, weights, rows):
        d, m, levels = self._levels(blocks, weights, rows)
        parts = [fp16_bytes(d), fp16_bytes(m), _pack_fifth_bits(levels), _pack_nibbles(levels)]
        return torch.cat(parts, dim=-1)

    def _decode_levels(self, raw):
        return _unpack_nibbles(raw[:, 8:24]) | (_unpack_fifth_bits(raw[:, 4:8]) << 4)
