"""K-quants with 8 sub-blocks of 32 weights and 6-bit scale/min pairs: Q4_K and Q5_K.

x = d * sc_j * q - dmin * m_j. Without importance this is ``quantize_row_q{4,5}_K_ref`` of
ggml-quants.c (make_qkx2_quants per sub-block, scales and mins rounded against their maxima);
with importance it is ``quantize_row_q{4,5}_K_impl`` (make_qkx3_quants, then make_qp_quants
fits the scales and mins themselves). Both requantize with the stored, rounded scales.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from llmquant.quant.ggml.base import GGMLType
from llmquant.quant.ggml.fitting import make_qkx_quants, make_qp_quants
from llmquant.quant.ggml.numerics import (
    div,
    fp16_bytes,
    fp16_from_bytes,
    fp16_round,
    nearest_int,
    pack_bits,
    positive_max,
    seq_sum,
    sqrt,
    to_byte,
    unpack_bits,
)
from llmquant.quant.ggml.superblock import QK_K, imatrix_weights, requantize


def pack_scale_min(scale_codes: torch.Tensor, min_codes: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins [N, 8] -> the 12 packed bytes of block_q4_K/q5_K.

    Bytes 0-3: scales 0-3 (+ top 2 bits of scales 4-7 at bits 6-7); bytes 4-7 the same for the
    mins; bytes 8-11: low nibbles of scales 4-7 | low nibbles of mins 4-7 << 4. Codes are whole
    bytes as C's uint8_t holds them, so out-of-range codes spill exactly as in C.
    """
    ls, lm = scale_codes.to(torch.int32), min_codes.to(torch.int32)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return to_byte(torch.cat([first, second, third], dim=-1))  # [N, 12]


def unpack_scale_min(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes [N, 12] -> (scales, mins) [N, 8] int32, as get_scale_min_k4."""
    q = raw.to(torch.int32)
    scales = torch.cat([q[:, :4] & 63, (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)], dim=-1)
    mins = torch.cat([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=-1)
    return scales, mins


class _ScaleMinK(GGMLType):
    block_size, clip_group_size = QK_K, 32
    bits: int
    # make_qkx2_quants settings of the reference path: rmin, rdelta, nstep.
    ref_search: tuple[float, float, int]

    def _fit(self, blocks: torch.Tensor, weights: torch.Tensor | None):
        """-> (d, dmin) [N], packed scale bytes [N, 12], fitted levels [N, 8, 32]."""
        nmax = (1 << self.bits) - 1
        sub = blocks.reshape(-1, 32)  # [N * 8, 32]
        if weights is None:
            spread = sqrt(div(seq_sum(sub * sub), 32.0))  # av_x: RMS of the sub-block
            sub_weights = spread[:, None] + sub.abs()
            scales, mins, levels = make_qkx_quants(sub, sub_weights, nmax, *self.ref_search, False)
            scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)  # [N, 8]
            max_scale, max_min = positive_max(scales), positive_max(mins)
            scale_inverse = torch.where(max_scale > 0, div(63.0, max_scale), 0.0)
            min_inverse = torch.where(max_min > 0, div(63.0, max_min), 0.0)
            # uint8_t ls = nearest_int(...); ls = MIN(63, ls);
            scale_codes = to_byte(nearest_int(scale_inverse[:, None] * scales)).clamp(max=63)
            min_codes = to_byte(nearest_int(min_inverse[:, None] * mins)).clamp(max=63)
            d, dmin = div(max_scale, 63.0), div(max_min, 63.0)
        else:
            qw = imatrix_weights(blocks, weights, 2.0).reshape(-1, 32)  # [N * 8, 32]
            scales, mins, levels = make_qkx_quants(sub, qw, nmax, -0.9, 0.05, 36, False)
            sub_weight = seq_sum(qw).reshape(-1, 8)  # [N, 8]
            d, scale_codes = make_qp_quants(scales.reshape(-1, 8), 63, sub_weight)
            dmin, min_codes = make_qp_quants(mins.reshape(-1, 8), 63, sub_weight)
            if self.bits == 5:  # only Q5_K's impl applies MIN(63, ...) here
                scale_codes, min_codes = scale_codes.clamp(max=63), min_codes.clamp(max=63)
        scale_bytes = pack_scale_min(scale_codes, min_codes)
        sc, m = unpack_scale_min(scale_bytes)
        step = fp16_round(d)[:, None] * sc.to(torch.float32)  # [N, 8]
        offset = fp16_round(dmin)[:, None] * m.to(torch.float32)
        levels = requantize(
            blocks.reshape(-1, 8, 32), levels.reshape(-1, 8, 32), step, offset, 0, nmax
        )
        return d, dmin, scale_bytes, levels.to(torch.int32)

    def _decode_parts(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> per-sub-block step and offset [N, 8] from d, dmin and the packed scales."""
        d, dmin = fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4])
        sc, m = unpack_scale_min(raw[:, 4:16])
        return d[:, None] * sc.to(torch.float32), dmin[:, None] * m.to(torch.float32)


class Q4_K(_ScaleMinK):
    name = "Q4_K"
    type_id = GGMLQuantizationType.Q4_K
    type_size, bits = 144, 4
    ref_search = (-1.0, 0.1, 20)

    def _encode_blocks(self, blocks, weights, rows):
        d, dmin, scale_bytes, levels = self._fit(blocks, weights)
        pairs = levels.reshape(-1, 4, 2, 32)  # [N, chunk, low/high nibble, 32]
        qs = pack_bits(pairs, 4).reshape(-1, 128)
        return torch.cat([fp16_bytes(d), fp16_bytes(dmin), scale_bytes, qs], dim=-1)

    def _decode_blocks(self, raw):
        step, offset = self._decode_parts(raw)
        q = unpack_bits(raw[:, 16:144].reshape(-1, 4, 32), 4, 2).reshape(-1, 8, 32)
        return (step[..., None] * q.to(torch.float32) - offset[..., None]).reshape(-1, QK_K)


class Q5_K(_ScaleMinK):
    name = "Q5_K"
    type_id = GGMLQuantizationType.Q5_K
    type_size, bits = 176, 5
    ref_search = (-0.5, 0.1, 15)

    def _encode_blocks(self, blocks, weights, rows):
        d, dmin, scale_bytes, levels = self._fit(blocks, weights)
        pairs = levels.reshape(-1, 4, 2, 32)  # [N, chunk, low/high nibble, 32]
        qs = pack_bits(pairs & 0xF, 4).reshape(-1, 128)
        qh = pack_bits((levels >> 4).reshape(-1, 8, 32), 1)  # bit 2c + h: sub-block 2c + h
        return torch.cat([fp16_bytes(d), fp16_bytes(dmin), scale_bytes, qh, qs], dim=-1)

    def _decode_blocks(self, raw):
        step, offset = self._decode_parts(raw)
        low = unpack_bits(raw[:, 48:176].reshape(-1, 4, 32), 4, 2).reshape(-1, 8, 32)
        high = unpack_bits(raw[:, 16:48], 1, 8)  # [N, 8, 32]
        q = (low | (high << 4)).to(torch.float32)
        return (step[..., None] * q - offset[..., None]).reshape(-1, QK_K)
