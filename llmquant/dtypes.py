"""The one table of float dtypes a model, a scale or a compute step may be given in."""

from __future__ import annotations

import torch

from llmquant.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_named(name: str, where: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` ("bfloat16", "torch.float16", ...)."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise InputError(f"{where}: dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of ``dtype`` ("bfloat16")."""
    return next(name for name, value in DTYPES.items() if value == dtype)
