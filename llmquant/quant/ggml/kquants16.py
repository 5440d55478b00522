"""K-quants with sub-blocks of 16 weights: Q2_K, Q3_K, Q6_K.

Without importance each is ``quantize_row_*_ref`` of ggml-quants.c (what ``quantize_*`` and so
llama-quantize run when no imatrix is given); with importance it is ``quantize_row_*_impl``
(the imatrix path). Each fits every sub-block, quantizes the sub-block scales against one fp16
super-block scale, then requantizes the weights with the stored, rounded scales.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from llmquant.quant.ggml.base import GGMLType
from llmquant.quant.ggml.fitting import (
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
)
from llmquant.quant.ggml.numerics import (
    GROUP_MAX_EPS,
    div,
    fp16_bytes,
    fp16_from_bytes,
    fp16_round,
    nearest_int,
    pack_bits,
    positive_max,
    seq_sum,
    signed_absmax,
    to_byte,
    unpack_bits,
)
from llmquant.quant.ggml.superblock import (
    QK_K,
    imatrix_weights,
    pack_2bit,
    requantize,
    unpack_2bit,
)


def _as_int8(values: torch.Tensor) -> torch.Tensor:
    """The value of a C ``int8_t`` assigned an int: wraps modulo 256 into -128..127."""
    return torch.remainder(values + 128, 256) - 128


class Q2_K(GGMLType):
    """16 sub-blocks of 16: x = d * sc_j * q - dmin * m_j, q in 0..3, 4-bit sc_j and m_j."""

    name = "Q2_K"
    type_id = GGMLQuantizationType.Q2_K
    block_size, type_size, clip_group_size = QK_K, 84, 16

    def _encode_blocks(self, blocks, weights, rows):
        sub = blocks.reshape(-1, 16)  # [N * 16, 16]
        if weights is None:
            scales, mins, levels = make_qkx_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)  # [N, 16]
            max_scale, max_min = positive_max(scales), positive_max(mins)
            scale_inverse = torch.where(max_scale > 0, div(15.0, max_scale), 0.0)
            min_inverse = torch.where(max_min > 0, div(15.0, max_min), 0.0)
            scale_codes = nearest_int(scale_inverse[:, None] * scales)
            min_codes = nearest_int(min_inverse[:, None] * mins)
            d = torch.where(max_scale > 0, div(max_scale, 15.0), 0.0)
            dmin = torch.where(max_min > 0, div(max_min, 15.0), 0.0)
        else:
            qw = imatrix_weights(blocks, weights, 1.0).reshape(-1, 16)  # [N * 16, 16]
            scales, mins, levels = make_qkx_quants(sub, qw, 3, -0.9, 0.05, 36, False)
            sub_weight = seq_sum(qw).reshape(-1, 16)  # [N, 16]
            d, scale_codes = make_qp_quants(scales.reshape(-1, 16), 15, sub_weight)
            dmin, min_codes = make_qp_quants(mins.reshape(-1, 16), 15, sub_weight)
        codes = torch.bitwise_or(to_byte(scale_codes), to_byte(min_codes * 16))  # [N, 16]
        codes_int = codes.to(torch.int32)
        step = fp16_round(d)[:, None] * (codes_int & 0xF).to(torch.float32)
        offset = fp16_round(dmin)[:, None] * (codes_int >> 4).to(torch.float32)
        levels = requantize(
            blocks.reshape(-1, 16, 16), levels.reshape(-1, 16, 16), step, offset, 0, 3
        )  # [N, 16, 16]
        qs = pack_2bit(levels.reshape(-1, QK_K))
        return torch.cat([codes, qs, fp16_bytes(d), fp16_bytes(dmin)], dim=-1)

    def _decode_blocks(self, raw):
        codes = raw[:, :16].to(torch.int32)
        d, dmin = fp16_from_bytes(raw[:, 80:82]), fp16_from_bytes(raw[:, 82:84])
        step = d[:, None] * (codes & 0xF).to(torch.float32)  # [N, 16]
        offset = dmin[:, None] * (codes >> 4).to(torch.float32)
        q = unpack_2bit(raw[:, 16:80]).to(torch.float32).reshape(-1, 16, 16)
        return (step[..., None] * q - offset[..., None]).reshape(-1, QK_K)


def _pack_q3_scales(codes: torch.Tensor) -> torch.Tensor:
    """16 6-bit codes [N, 16] -> 12 bytes: low nibbles (0..7 | 8..15 << 4), then 2-bit tops."""
    codes = codes.to(torch.int32)
    low = pack_bits((codes & 0xF).reshape(-1, 2, 8), 4)  # [N, 8]
    high = pack_bits((codes >> 4).reshape(-1, 4, 4), 2)  # [N, 4]: byte k holds codes k + 4q
    return torch.cat([low, high], dim=-1)


def _unpack_q3_scales(raw: torch.Tensor) -> torch.Tensor:
    """12 scale bytes [N, 12] -> [N, 16] signed int32 scales (code - 32)."""
    low = unpack_bits(raw[:, :8], 4, 2).reshape(-1, 16)
    high = unpack_bits(raw[:, 8:12], 2, 4).reshape(-1, 16)
    return (low | (high << 4)) - 32


class Q3_K(GGMLType):
    """16 sub-blocks of 16: x = d * (code_j - 32) * q, q in -4..3 (2 low bits + a high-bit mask)."""

    name = "Q3_K"
    type_id = GGMLQuantizationType.Q3_K
    block_size, type_size, clip_group_size = QK_K, 110, 16

    def _encode_blocks(self, blocks, weights, rows):
        sub = blocks.reshape(-1, 16)  # [N * 16, 16]
        if weights is None:
            scales, levels = make_q3_quants(sub, 4)
            scales = scales.reshape(-1, 16)  # [N, 16]
            _, max_scale = signed_absmax(scales)
            nonzero = max_scale != 0
            inverse = torch.where(nonzero, div(-32.0, max_scale), 0.0)
            codes = _as_int8(nearest_int(inverse[:, None] * scales)).clamp(-32, 31) + 32
            codes = torch.where(nonzero[:, None], codes, 0.0)
            d = torch.where(nonzero, div(1.0, inverse), 0.0)
        else:
            qw = imatrix_weights(blocks, weights, 2.0).reshape(-1, 16)  # [N * 16, 16]
            scales, levels = make_qx_quants(sub, 4, qw)
            d, codes = make_qx_quants(scales.reshape(-1, 16), 32, seq_sum(qw).reshape(-1, 16))
        scale_bytes = _pack_q3_scales(codes)
        step = fp16_round(d)[:, None] * _unpack_q3_scales(scale_bytes).to(torch.float32)
        # All-zero sub-blocks come out of the fit with level 0 (not 4) and keep it.
        levels = levels.reshape(-1, 16, 16) - 4
        levels = requantize(blocks.reshape(-1, 16, 16), levels, step, None, -4, 3) + 4
        levels = levels.reshape(-1, QK_K).to(torch.int32)  # [N, 256] in 0..7
        hmask = pack_bits((levels >> 2).reshape(-1, 8, 32), 1)  # bit b of byte t: element 32b + t
        return torch.cat([hmask, pack_2bit(levels & 3), scale_bytes, fp16_bytes(d)], dim=-1)

    def _decode_blocks(self, raw):
        high = unpack_bits(raw[:, :32], 1, 8).reshape(-1, QK_K)
        q = (unpack_2bit(raw[:, 32:96]) - 4 * (1 - high)).to(torch.float32)
        scales = _unpack_q3_scales(raw[:, 96:108]).to(torch.float32)
        step = fp16_from_bytes(raw[:, 108:110])[:, None] * scales  # [N, 16]
        return (step[..., None] * q.reshape(-1, 16, 16)).reshape(-1, QK_K)


class Q6_K(GGMLType):
    """16 sub-blocks of 16: x = d * sc_j * (q - 32), q 6-bit (4 low + 2 high bits), int8 sc_j."""

    name = "Q6_K"
    type_id = GGMLQuantizationType.Q6_K
    block_size, type_size, clip_group_size = QK_K, 210, 16

    def _encode_blocks(self, blocks, weights, rows):
        # The imatrix path passes the raw importance as weights (its sigma2 form is commented out).
        sub_weights = None if weights is None else weights.reshape(-1, 16)
        scales, levels = make_qx_quants(blocks.reshape(-1, 16), 32, sub_weights)
        scales = scales.reshape(-1, 16)  # [N, 16]
        max_abs, max_scale = signed_absmax(scales)
        inverse = div(-128.0, max_scale)
        codes = _as_int8(nearest_int(inverse[:, None] * scales).clamp(max=127))
        d = div(1.0, inverse)
        step = fp16_round(d)[:, None] * codes
        levels = levels.reshape(-1, 16, 16) - 32
        levels = requantize(blocks.reshape(-1, 16, 16), levels, step, None, -32, 31) + 32
        levels = levels.reshape(-1, 2, 4, 32).to(torch.int32)  # [N, half, quarter, 32]
        low = levels & 0xF
        ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(-1, 128)
        qh = pack_bits(levels >> 4, 2).reshape(-1, 64)
        raw = torch.cat([to_byte(ql), qh, to_byte(codes), fp16_bytes(d)], dim=-1)
        return torch.where((max_abs < GROUP_MAX_EPS)[:, None], 0, raw)

    def _decode_blocks(self, raw):
        ql = raw[:, :128].to(torch.int32).reshape(-1, 2, 2, 32)
        low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # [N, 2, 4, 32]
        high = unpack_bits(raw[:, 128:192].reshape(-1, 2, 32), 2, 4)  # [N, 2, 4, 32]
        q = ((low | (high << 4)) - 32).to(torch.float32).reshape(-1, 16, 16)
        scales = raw[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        step = fp16_from_bytes(raw[:, 208:210])[:, None] * scales  # [N, 16]
        return (step[..., None] * q).reshape(-1, QK_K)
