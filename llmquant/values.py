"""Finite values, always: NaN/Inf counts of tensors and the checks built on them.

A non-finite *source* value is the user's (a damaged checkpoint: exit 2 naming the tensor); a
non-finite value in something llmquant computed is an internal failure naming where it came
from (exit 1). Counting runs in row chunks so a 1-billion-element embedding never needs a
second full-size copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from tqdm import tqdm

from llmquant.errors import InputError, NonFiniteResult

CHUNK_ELEMENTS = 1 << 24  # a 64 MB boolean mask at most


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a float tensor; (0, 0) for integer or meta tensors."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return 0, 0
    flat = tensor.detach().reshape(-1)  # [numel]
    nan = inf = 0
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        chunk = flat[start : start + CHUNK_ELEMENTS]
        finite = torch.isfinite(chunk)
        if bool(finite.all()):
            continue
        n_nan = int(torch.isnan(chunk).sum())
        nan += n_nan
        inf += int((~finite).sum()) - n_nan
    return nan, inf


def describe(nan: int, inf: int, total: int) -> str:
    return f"{nan} NaN and {inf} Inf values of {total}"


def check_source_tensor(name: str, tensor: torch.Tensor, where: str) -> None:
    """InputError naming the tensor of the checkpoint at ``where`` when it is not finite."""
    nan, inf = nonfinite_counts(tensor)
    if nan or inf:
        raise InputError(
            f"{where}: tensor {name} holds {describe(nan, inf, tensor.numel())}; the checkpoint "
            "is damaged (re-download or re-convert it)"
        )


def check_result(where: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """NonFiniteResult naming ``where`` (block and linear) and the tensor that is not finite."""
    for name, tensor in tensors:
        nan, inf = nonfinite_counts(tensor)
        if nan or inf:
            raise NonFiniteResult(
                f"{where}: {name} has {describe(nan, inf, tensor.numel())} (an internal "
                "failure of llmquant; please report it with the recipe)"
            )


def check_perplexity(name: str, value: float, cause: str | None = None) -> float:
    """``value`` when finite; NonFiniteResult naming the perplexity (and ``cause``) otherwise."""
    if not math.isfinite(value):
        raise NonFiniteResult(
            f"perplexity {name} is {value}: the model's outputs are not finite ("
            + (cause or "its weights were checked; an internal failure of llmquant, please "
               "report it")
            + ")"
        )  # fmt: skip
    return value


def check_fits_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """InputError naming the first float tensor whose values ``dtype`` cannot hold (float16's
    range is +-65504; bfloat16 and float32 hold what checkpoints store)."""
    if dtype != torch.float16:
        return
    limit = torch.finfo(torch.float16).max
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and tensor.device.type != "meta":
            peak = tensor.detach().abs().max().item()
            if peak > limit:
                raise InputError(
                    f"model.dtype float16: tensor {name} holds values up to {peak:.4g}, beyond "
                    f"float16's {limit:.0f}; use model.dtype auto, bfloat16 or float32"
                )


def check_source(
    tensors: Iterable[tuple[str, torch.Tensor]], where: str, narrow_to: torch.dtype | None = None
) -> None:
    """One pass over a checkpoint's stored tensors (``tensors.iter_tensors``), tensor by
    tensor: every value finite, and (``narrow_to`` float16) within float16's range."""
    for name, tensor in tqdm(tensors, desc="checking weights", unit="tensor", leave=False):
        check_source_tensor(name, tensor, where)
        if narrow_to is not None:
            check_fits_dtype({name: tensor}, narrow_to)
