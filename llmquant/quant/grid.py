"""Integer grids for grouped weight quantization: pure tensor functions, no module plumbing.

A weight ``w`` of shape [out, in] is split into groups of ``group_size`` consecutive input
channels per output row (``group_size == -1``: one group per row). Each group gets a float
scale and, for asymmetric grids, an integer zero point, so that ``w ~= (q - zero) * scale``.

Conventions (chosen to match what the serving formats store):
- symmetric: signed codes in [-2^(b-1), 2^(b-1) - 1], scale = absmax / (2^(b-1) - 1), no zero;
- asymmetric: unsigned codes in [0, 2^b - 1] and an unsigned integer zero point; the group's
  range is widened to contain 0 so the zero point never clamps and 0.0 is exact.
Scales are rounded to ``scale_dtype`` (float16 by default) *before* the codes are chosen, so the
codes are optimal for the scale a checkpoint really stores and a written checkpoint dequantizes
to exactly the weights the pipeline evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SCALE = 1e-8


@dataclass(frozen=True)
class IntGrid:
    """An integer grid: bit width, group size (-1 = per output channel) and symmetry."""

    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype = torch.float16
    # Smallest scale; a value exact in every dtype the scales are stored in (2^-14, float16's
    # smallest normal, keeps bfloat16 scales exact in float16 too).
    min_scale: float = MIN_SCALE

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per channel) or >= 1, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def groups_for(self, in_features: int) -> int:
        """Number of groups per row; raises ValueError naming working sizes if it does not fit."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            fits = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise ValueError(
                f"group_size {self.group_size} does not divide input width {in_features}; "
                f"sizes that would work: {fits or 'per-channel (-1)'}"
            )
        return in_features // self.group_size

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        group = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {group} {kind}"


@dataclass
class GroupedCodes:
    """Integer codes of one weight with their group scales and zero points."""

    codes: torch.Tensor  # int16 [out, in]
    scales: torch.Tensor  # float32 [out, n_groups], values representable in grid.scale_dtype
    zeros: torch.Tensor | None  # int16 [out, n_groups] (asymmetric only)
    grid: IntGrid


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group] (a view; group_size -1 means the whole row)."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    return w.reshape(out_features, in_features // size, size)  # [out, n_groups, group]


def clamp_to_clip(w: torch.Tensor, group_size: int, clip: torch.Tensor) -> torch.Tensor:
    """Clamp each group of ``w`` [out, in] to its own range shrunk by ``clip`` [out, n_groups].

    For min/max grids this is identical to shrinking the range when choosing the scale, so any
    quantizer can be clipped by quantizing the clamped weight.
    """
    groups = group_view(w, group_size)  # [out, n_groups, group]
    upper = groups.amax(dim=-1, keepdim=True).clamp(min=0) * clip.unsqueeze(-1)
    lower = groups.amin(dim=-1, keepdim=True).clamp(max=0) * clip.unsqueeze(-1)
    return torch.maximum(torch.minimum(groups, upper), lower).reshape(w.shape)  # [out, in]


def _scales_and_zeros(
    w_groups: torch.Tensor, grid: IntGrid, clip: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) per group of ``w_groups`` [out, n_groups, group]; clip shrinks the range."""
    if grid.symmetric:
        absmax = w_groups.abs().amax(dim=-1)  # [out, n_groups]
        if clip is not None:
            absmax = absmax * clip
        scales = (absmax / grid.qmax).clamp(min=grid.min_scale)
        return scales.to(grid.scale_dtype).float().clamp(min=grid.min_scale), None
    w_max = w_groups.amax(dim=-1).clamp(min=0)  # [out, n_groups]
    w_min = w_groups.amin(dim=-1).clamp(max=0)
    if clip is not None:
        w_max, w_min = w_max * clip, w_min * clip
    scales = ((w_max - w_min) / grid.qmax).clamp(min=grid.min_scale)
    scales = scales.to(grid.scale_dtype).float().clamp(min=grid.min_scale)
    zeros = torch.round(-w_min / scales).clamp(0, grid.qmax)
    return scales, zeros


def quantize(w: torch.Tensor, grid: IntGrid, clip: torch.Tensor | None = None) -> GroupedCodes:
    """Round-to-nearest grouped quantization of ``w`` [out, in].

    ``clip`` ([out, n_groups] or broadcastable, values in (0, 1]) shrinks each group's range
    before the scale is chosen; values beyond it saturate at the grid's ends.
    """
    grid.groups_for(w.shape[1])
    w_groups = group_view(w.float(), grid.group_size)  # [out, n_groups, group]
    scales, zeros = _scales_and_zeros(w_groups, grid, clip)
    shifted = torch.round(w_groups / scales.unsqueeze(-1))
    if zeros is not None:
        shifted = shifted + zeros.unsqueeze(-1)
    codes = shifted.clamp(grid.qmin, grid.qmax).reshape(w.shape)  # [out, in]
    return GroupedCodes(
        codes=codes.to(torch.int16),
        scales=scales,
        zeros=None if zeros is None else zeros.to(torch.int16),
        grid=grid,
    )


def dequantize(q: GroupedCodes) -> torch.Tensor:
    """Float32 weight [out, in] from codes, scales and zero points."""
    codes = group_view(q.codes.float(), q.grid.group_size)  # [out, n_groups, group]
    if q.zeros is not None:
        codes = codes - q.zeros.float().unsqueeze(-1)
    return (codes * q.scales.unsqueeze(-1)).reshape(q.codes.shape)  # [out, in]


def fake_quant(w: torch.Tensor, grid: IntGrid, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize, in the dtype of ``w``."""
    return dequantize(quantize(w, grid, clip)).to(w.dtype)
