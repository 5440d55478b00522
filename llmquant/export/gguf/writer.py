"""Write one GGUF file from Hugging Face tensors, streaming tensor by tensor.

Design: the tensor source is **re-iterable** and is iterated twice. GGUF puts every tensor's name,
shape and type before the data, and llama.cpp's mixes need all names and shapes before choosing
the first type (e.g. whether ``output.weight`` exists decides the embedding's type). Pass 1 reads
names and shapes (from ``source.shapes()`` when the source has it, e.g. safetensors headers,
otherwise by iterating); pass 2 converts, quantizes and writes one tensor at a time, so peak
memory is one tensor (one decoder block for a ``RunTensors`` source). A one-shot iterator is
rejected. The file is written under a temporary name and renamed when complete.

A source yields ``(hf_name, float tensor, importance or None)``; importance is the per-input-channel
mean x² (llama.cpp's imatrix) that importance-aware quantizers (K-quants) use.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from llmquant.export.gguf.mixes import block_size, get_mix, tensor_types
from llmquant.export.gguf.names import TensorMapper, arch_info
from llmquant.export.gguf.tokenizer import add_tokenizer

log = logging.getLogger(__name__)

TensorItem = tuple[str, torch.Tensor, "torch.Tensor | None"]
_BLOCK_NAME = re.compile(r"(^|\.)layers\.\d+\.")


class FolderTensors:
    """The float tensors of a Hugging Face folder's ``*.safetensors`` files, loaded one by one."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors files")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = tuple(f.get_slice(key).get_shape())
        return out

    def __iter__(self) -> Iterator[TensorItem]:
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key), None


class RunTensors:
    """A finished quantization run: non-block tensors from the source folder, blocks from the
    run's block files (transformed weights, with each linear's mean x² as importance)."""

    def __init__(self, run: Any):  # llmquant.quant.results.QuantizedRun
        self.run = run
        self.folder = FolderTensors(run.source_dir)

    @property
    def has_importance(self) -> bool:
        """Whether the run recorded activation statistics (llama.cpp's "has imatrix")."""
        from llmquant.quant.results import block_file

        if self.run.n_blocks == 0:
            return False
        with safe_open(str(block_file(self.run.blocks_dir, 0)), framework="pt") as f:
            return any(k.endswith(".act_mean_sq") for k in f.keys())

    def _outer_names(self) -> dict[str, tuple[int, ...]]:
        return {k: v for k, v in self.folder.shapes().items() if not _BLOCK_NAME.search(k)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from llmquant.quant.results import block_file

        out = self._outer_names()
        for i in range(self.run.n_blocks):
            with safe_open(str(block_file(self.run.blocks_dir, i)), framework="pt") as f:
                for key in f.keys():
                    if _is_block_tensor(key):
                        out[key] = tuple(f.get_slice(key).get_shape())
        return out

    def __iter__(self) -> Iterator[TensorItem]:
        outer = self._outer_names()
        for name, tensor, _ in self.folder:
            if name in outer:
                yield name, tensor, None
        for block in self.run.iter_blocks():
            for name, tensor in block.tensors.items():
                lin = block.linears.get(name.removesuffix(".weight"))
                yield name, tensor, (lin.mean_sq if lin is not None else None)


def _is_block_tensor(key: str) -> bool:
    """Block files also hold codes and statistics; only float tensors are model tensors."""
    return not key.endswith((".qcodes", ".qscales", ".qzeros", ".act_mean_abs", ".act_mean_sq"))


# --- quantizers: llmquant.quant.ggml when present, else gguf-py's legacy quantizers ---
class _GgufPyType:
    """Stand-in with the llmquant.quant.ggml interface, for the types gguf-py can quantize."""

    def __init__(self, name: str):
        self.name = name
        self.qtype = gguf.GGMLQuantizationType[name]

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
        return gguf.quants.quantize(w.numpy(), self.qtype)


_GGUF_PY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16")


def get_quantizer(type_name: str) -> Any:
    """An object with ``quantize(w [rows, cols] f32, importance [cols] | None) -> uint8``."""
    try:
        from llmquant.quant.ggml import get_ggml_type
    except ImportError:
        get_ggml_type = None
    if get_ggml_type is not None:
        return get_ggml_type(type_name)
    if type_name in _GGUF_PY_TYPES:
        return _GgufPyType(type_name)
    raise ValueError(f"no quantizer for GGML type {type_name} (llmquant.quant.ggml is missing)")


def encode(w: torch.Tensor, type_name: str, importance: torch.Tensor | None) -> np.ndarray:
    """The array stored for float32 ``w`` in ``type_name`` (float values or block bytes)."""
    if type_name == "F32":
        return np.ascontiguousarray(w.numpy(), dtype=np.float32)
    if type_name == "F16":
        return np.ascontiguousarray(w.numpy().astype(np.float16))
    rows = w.reshape(-1, w.shape[-1])  # [rows, cols]: blocks run along the row
    data = get_quantizer(type_name).quantize(rows, importance)
    return np.ascontiguousarray(data, dtype=np.uint8)


def tensor_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {type_name}'s block {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _check_reiterable(tensors: Iterable[TensorItem]) -> None:
    if iter(tensors) is tensors:
        raise ValueError(
            "write_gguf needs a re-iterable tensor source (a list, FolderTensors, RunTensors), "
            "not a one-shot iterator: it reads names and shapes first, then the data"
        )


def _source_shapes(tensors: Iterable[TensorItem]) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Names and shapes of the source, and whether it carries importance statistics."""
    shapes_fn = getattr(tensors, "shapes", None)
    if callable(shapes_fn):
        return dict(shapes_fn()), bool(getattr(tensors, "has_importance", False))
    shapes, has_importance = {}, False
    for name, t, importance in tensors:
        shapes[name] = tuple(t.shape)
        has_importance |= importance is not None
    return shapes, has_importance


def load_config(source_dir: Path) -> dict:
    path = Path(source_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the GGUF writer needs the model's config)")
    config = json.loads(path.read_text())
    if "text_config" in config:  # multimodal wrappers keep the language model's keys here
        config = {**config, **config["text_config"]}
    return config


def _add_metadata(w: gguf.GGUFWriter, config: dict, mapper: TensorMapper, name: str | None,
                  file_type: int, source_dir: Path, pre: str | None) -> None:  # fmt: skip
    w.add_type("model")
    w.add_name(
        name
        or config.get("_name_or_path")
        or config.get("_model_name_or_path")  # what a GGUF-loaded transformers config keeps
        or Path(source_dir).name
    )
    for key, value in mapper.spec.hparams(config).items():
        getattr(w, f"add_{key}")(value)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, source_dir, config["vocab_size"], pre, mapper.spec.add_space_prefix)


def _plan(
    tensors: Iterable[TensorItem],
    mapper: TensorMapper,
    extra: dict[str, torch.Tensor],
    mix: str,
    config: dict,
    type_for: Callable[[str, tuple], str | None] | None,
) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, str]]:
    """Pass 1: GGUF name -> HF name, shape and type, in file order."""
    hf_of: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    source_shapes, has_importance = _source_shapes(tensors)
    for hf_name, shape in source_shapes.items():
        gname = mapper.gguf_name(hf_name)
        if gname is None:
            continue
        if len(shape) > 2:
            raise ValueError(f"tensor {hf_name!r}: {len(shape)}-D tensors are not supported")
        hf_of[gname], shapes[gname] = hf_name, tuple(shape)
    for gname, t in extra.items():
        hf_of[gname], shapes[gname] = gname, tuple(t.shape)
    types = tensor_types(mix, arch_info(config), shapes, has_importance)
    for gname, shape in shapes.items():
        if type_for is not None and len(shape) >= 2 and (t := type_for(gname, shape)) is not None:
            types[gname] = t.upper()
        if shape[-1] % block_size(types[gname]):
            raise ValueError(
                f"tensor {gname} ({hf_of[gname]}): row length {shape[-1]} is not a multiple of "
                f"{types[gname]}'s block size {block_size(types[gname])}"
            )
    return hf_of, shapes, types


def write_gguf(
    source_dir: Path,
    tensors: Iterable[TensorItem],
    out_path: Path,
    ftype: str,
    type_for: Callable[[str, tuple], str | None] | None = None,
    *,
    name: str | None = None,
    pre: str | None = None,
    progress: bool = True,
) -> Path:
    """Write ``tensors`` (HF names, float values, optional importance) as one GGUF file.

    ``ftype`` is a llama.cpp mix name (``mixes.MIXES``: "F32", "Q8_0", "Q4_K_M", ...): it sets
    ``general.file_type`` and every tensor's type as llama-quantize would choose it.
    ``type_for(gguf_name, shape)`` may override the type of any 2-D tensor (return None to keep
    the mix's choice); shapes are in torch order, ``shape[-1]`` being the row length.
    ``source_dir`` holds config.json and the tokenizer. ``pre`` forces ``tokenizer.ggml.pre``.
    """
    source_dir, out_path = Path(source_dir), Path(out_path)
    _check_reiterable(tensors)
    mix = get_mix(ftype)
    config = load_config(source_dir)
    mapper = TensorMapper(config)
    extra = mapper.extra_tensors()
    hf_of, shapes, types = _plan(tensors, mapper, extra, mix.name, config, type_for)
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{source_dir}: no embedding tensor found (expected model.embed_tokens)")

    order = list(shapes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(None, mapper.spec.name)
    try:
        _add_metadata(writer, config, mapper, name, mix.file_type, source_dir, pre)
        for gname in order:
            t = types[gname]
            writer.add_tensor_info(
                gname, shapes[gname], np.dtype(np.float32), tensor_nbytes(shapes[gname], t),
                raw_dtype=gguf.GGMLQuantizationType[t],
            )  # fmt: skip
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        # pass 2: data, in the same order (extra tensors are generated, the rest streamed)
        expected = iter(order)
        bar = tqdm(total=len(order), desc=f"GGUF {mix.name}", disable=not progress, unit="tensor")
        for gname, tensor, importance in _data_items(tensors, mapper, extra):
            want = next(expected, None)
            if gname != want:
                raise ValueError(
                    f"tensor source changed between passes: got {gname}, expected {want}"
                )
            w = tensor if gname in extra else mapper.convert(hf_of[gname], tensor)
            imp = None if importance is None else importance.detach().float().cpu()
            if imp is not None and tuple(imp.shape) != (w.shape[-1],):
                shape = tuple(imp.shape)
                raise ValueError(f"tensor {gname}: importance {shape}, expected ({w.shape[-1]},)")
            data = encode(w.contiguous(), types[gname], imp)
            writer.write_tensor_data(data)
            bar.update(1)
        bar.close()
        if (missing := next(expected, None)) is not None:
            raise ValueError(f"tensor source ended before {missing} on the second pass")
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %d tensors)", out_path, mix.name, len(order))
    return out_path


def _data_items(
    tensors: Iterable[TensorItem], mapper: TensorMapper, extra: dict[str, torch.Tensor]
) -> Iterator[tuple[str, Any, torch.Tensor | None]]:
    for hf_name, tensor, importance in tensors:
        gname = mapper.gguf_name(hf_name)
        if gname is not None:
            yield gname, tensor, importance
    for gname, t in extra.items():
        yield gname, t.float(), None
