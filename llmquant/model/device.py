"""Where blocks run and in which dtype: ``runtime.device`` and ``runtime.compute_dtype``.

Only the current block, its activations and the search buffers live on the device; the
embeddings, lm_head, the other blocks and (when they do not fit under ``max_device_gb``) the
activation streams between blocks stay on the host.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import AfterValidator

from llmquant.dtypes import dtype_named
from llmquant.errors import InputError

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _device_name(value: str) -> str:
    if not DEVICE_PATTERN.match(value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


# A device setting in a config model (recipe ``runtime.device``, evaluation job ``device``).
DeviceName = Annotated[str, AfterValidator(_device_name)]


def resolve_device(spec: str, where: str = "runtime.device") -> torch.device:
    """``auto`` (the first GPU torch sees, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if not DEVICE_PATTERN.match(spec):
        raise InputError(f"{where}: {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if count == 0:
        raise InputError(f"{where}: {spec!r}, but torch sees no GPU here; use cpu (or auto)")
    if index >= count:
        raise InputError(
            f"{where}: {spec!r}, but torch sees {count} GPU(s): use cuda:0 .. cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def resolve_compute_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (exact statistics on any CPU), bfloat16 on a GPU.

    bfloat16 on a CPU pays only where the CPU multiplies it natively (AVX512-BF16 or AMX: about
    twice float32's matrix-product rate); elsewhere torch emulates it, slower than float32, and
    the run says so."""
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    dtype = dtype_named(spec, "runtime.compute_dtype")
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        log.warning(
            "runtime.compute_dtype bfloat16: this CPU has no native bfloat16 matrix products "
            "(AVX512-BF16 or AMX), so blocks run slower than in float32; set "
            "runtime.compute_dtype=float32 for speed here"
        )
    return dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of a GPU; None for the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


def to_device(value, device: torch.device, float_dtype: torch.dtype | None = None):
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``, and its
    floating tensors cast to ``float_dtype`` when given."""
    if isinstance(value, torch.Tensor):
        if float_dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=float_dtype)
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device, float_dtype) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device, float_dtype) for v in value)
    return value


def host_copies(batches: Iterable[torch.Tensor], pin: bool) -> list[torch.Tensor]:
    """Batches on the host, page-locked when ``pin`` (faster copies to a GPU)."""
    out = []
    for batch in batches:
        batch = batch.to("cpu")
        out.append(batch.pin_memory() if pin else batch)
    return out


@dataclass
class DeviceBudget:
    """How much of the device the run may use, and what one block needs there."""

    device: torch.device
    max_bytes: int | None  # None: no limit given and no GPU (the host's memory is the limit)
    block_bytes: int  # one block's weights in the compute dtype

    def streams_fit(self, stream_bytes: int) -> bool:
        """Whether the activation streams can live on the device next to a block in search."""
        if self.device.type == "cpu":
            return True  # the host is the device: nothing to move
        return self.max_bytes is not None and SEARCH_COPIES * self.block_bytes + (
            stream_bytes
        ) <= self.max_bytes


# A block in search holds its weights, their originals and one quantized candidate.
SEARCH_COPIES = 3


def device_budget(max_device_gb: float | None, device: torch.device, block_bytes: int):
    """The budget for ``device``; InputError naming ``runtime.max_device_gb`` when one block
    does not fit in it."""
    total = device_memory_bytes(device)
    max_bytes = int(max_device_gb * 2**30) if max_device_gb else None
    if max_bytes is None and total is not None:
        max_bytes = int(0.8 * total)
    need = SEARCH_COPIES * block_bytes
    if max_bytes is not None and need > max_bytes:
        raise InputError(
            f"runtime.max_device_gb: {max_bytes / 2**30:.2f} GB is less than one block needs on "
            f"{device} ({need / 2**30:.2f} GB: its weights and the search's copies); set it to "
            f"at least {need / 2**30:.2f}"
        )
    return DeviceBudget(device, max_bytes, block_bytes)


def place_batches(
    batches: list[torch.Tensor], device: torch.device, on_device: bool
) -> list[torch.Tensor]:
    """An activation stream on ``device`` when it fits there, else on the (pinned) host."""
    if device.type == "cpu":
        return batches
    if on_device:
        return [b.to(device) for b in batches]
    return host_copies(batches, pin=True)


# What Python, torch and the libraries hold before any model tensor (measured here: ~0.5 GB).
BASE_RSS_BYTES = 600 * 2**20


def predicted_peak_rss(
    streamed, load_dtype: torch.dtype, host_stream_bytes: int, writer_bytes: int
) -> int:
    """The host memory a run should peak at, from the skeleton alone (a model, not a bound):
    one block as read (load dtype), as run (compute dtype, when that is the host) and as saved
    (the transformed copy in the load dtype), the non-block modules (kept in the load dtype),
    the activation streams that live on the host with one block's outputs beside them, and the
    largest writer buffer."""
    load_size = torch.empty((), dtype=load_dtype).element_size()
    compute_size = torch.empty((), dtype=streamed.dtype).element_size()
    on_host = compute_size if streamed.device.type == "cpu" else 0
    block = streamed.block_numel() * (2 * load_size + on_host)
    outer = streamed.non_block_numel() * load_size
    return BASE_RSS_BYTES + block + outer + 2 * host_stream_bytes + writer_bytes
