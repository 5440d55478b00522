"""Write one GGUF file from Hugging Face tensors, streaming tensor by tensor.

GGUF puts every tensor's name, shape and type before the data, and llama.cpp's mixes need all
names and shapes before choosing the first type (e.g. whether ``output.weight`` exists decides
the embedding's type). So :func:`tensor_plan` reads names and shapes from the tensor source
(safetensors headers, block file headers) and decides every type; then the data is converted,
quantized and written one tensor at a time, so peak memory is one tensor (one decoder block for
a run folder). A run persists the types of each GGUF export before its first block
(``llmquant.formats.gguf``), and its writer is handed exactly those. The file is written under a
temporary name and renamed when complete.

``importance(hf_name)`` gives the per-input-channel mean x² (llama.cpp's imatrix) of a weight,
which importance-aware types (K-quants, and the legacy types' imatrix path) fit with.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from llmquant.cache import publish
from llmquant.errors import writing
from llmquant.export.gguf.mixes import block_size, get_mix, tensor_types
from llmquant.export.gguf.names import TensorMapper, arch_info
from llmquant.export.gguf.tokenizer import add_tokenizer
from llmquant.quant.ggml import GGML_TYPES, get_ggml_type
from llmquant.tensors import TensorSource, language_config, read_config

log = logging.getLogger(__name__)

Importance = Callable[[str], "torch.Tensor | None"]


def encode(w: torch.Tensor, type_name: str, importance: torch.Tensor | None) -> np.ndarray:
    """The array stored for float32 ``w`` in ``type_name`` (float values or block bytes)."""
    if type_name == "F32":
        return np.ascontiguousarray(w.numpy(), dtype=np.float32)
    if type_name == "F16":
        return np.ascontiguousarray(w.numpy().astype(np.float16))
    rows = w.reshape(-1, w.shape[-1])  # [rows, cols]: blocks run along the row
    data = get_ggml_type(type_name).quantize(rows, importance)
    return np.ascontiguousarray(data, dtype=np.uint8)


def tensor_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {type_name}'s block {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def aligned_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes a tensor takes in a GGUF file: its data padded to the file's alignment."""
    n = tensor_nbytes(shape, type_name)
    return -(-n // gguf.GGUF_DEFAULT_ALIGNMENT) * gguf.GGUF_DEFAULT_ALIGNMENT


def _open_writer(source_dir: Path, config: dict, mapper: TensorMapper, plan: TensorPlan,
                 file_type: int, name: str | None, pre: str | None) -> gguf.GGUFWriter:  # fmt: skip
    """A writer holding the file's metadata and every tensor's info, nothing written yet."""
    writer = gguf.GGUFWriter(None, mapper.spec.name)
    _add_metadata(writer, config, mapper, name, file_type, source_dir, pre)
    for gname, shape in plan.shapes.items():
        t = plan.types[gname]
        writer.add_tensor_info(
            gname, shape, np.dtype(np.float32), tensor_nbytes(shape, t),
            raw_dtype=gguf.GGMLQuantizationType[t],
        )  # fmt: skip
    return writer


def header_nbytes(source_dir: Path, plan: TensorPlan, ftype: str, name: str | None = None) -> int:
    """Bytes before the first tensor's data in the GGUF ``write_gguf`` makes of ``plan``
    (header, metadata, tensor infos, padding): they do not depend on the tensor types."""
    source_dir = Path(source_dir)
    config = language_config(read_config(source_dir))
    mapper = TensorMapper(config)
    writer = _open_writer(source_dir, config, mapper, plan, get_mix(ftype).file_type, name, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        try:
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        size = path.stat().st_size
    return -(-size // gguf.GGUF_DEFAULT_ALIGNMENT) * gguf.GGUF_DEFAULT_ALIGNMENT


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


@dataclass
class TensorPlan:
    """Every tensor of one GGUF file, in file order: its source name, shape and type."""

    hf_of: dict[str, str]  # GGUF name -> HF name (generated tensors: their own GGUF name)
    shapes: dict[str, tuple[int, ...]]
    types: dict[str, str]


def tensor_plan(
    config: dict,
    source_shapes: Mapping[str, tuple[int, ...]],
    mix: str,
    has_importance: bool,
    overrides: Mapping[str, str] | None = None,
) -> TensorPlan:
    """Names, shapes and llama.cpp's type choice for ``mix``; ``overrides`` (GGUF name ->
    type) replace the mix's choice for those 2-D tensors."""
    config = language_config(config)
    mapper = TensorMapper(config)
    hf_of: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for hf_name, shape in source_shapes.items():
        gname = mapper.gguf_name(hf_name)
        if gname is None:
            continue
        if len(shape) > 2:
            raise ValueError(f"tensor {hf_name!r}: {len(shape)}-D tensors are not supported")
        hf_of[gname], shapes[gname] = hf_name, tuple(shape)
    for gname, t in mapper.extra_tensors().items():
        hf_of[gname], shapes[gname] = gname, tuple(t.shape)
    types = tensor_types(get_mix(mix).name, arch_info(config), shapes, has_importance)
    for gname, t in (overrides or {}).items():
        if gname not in shapes:
            raise ValueError(f"type given for {gname}, which is not a tensor of this model")
        if t.upper() not in GGML_TYPES:
            raise ValueError(
                f"tensor {gname}: type {t!r} is not one llmquant writes ({', '.join(GGML_TYPES)})"
            )
        if len(shapes[gname]) >= 2:
            types[gname] = t.upper()
    for gname, shape in shapes.items():
        if shape[-1] % block_size(types[gname]):
            raise ValueError(
                f"tensor {gname} ({hf_of[gname]}): row length {shape[-1]} is not a multiple of "
                f"{types[gname]}'s block size {block_size(types[gname])}"
            )
    return TensorPlan(hf_of, shapes, types)


def source_shapes(tensors: TensorSource) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensors.shape(name)) for name in tensors.names()}


def write_gguf(
    source_dir: Path,
    tensors: TensorSource,
    out_path: Path,
    ftype: str,
    types: Mapping[str, str] | None = None,
    *,
    importance: Importance | None = None,
    name: str | None = None,
    pre: str | None = None,
    progress: bool = True,
) -> Path:
    """Write ``tensors`` (HF names, float values) as one GGUF file.

    ``ftype`` is a llama.cpp mix name (``mixes.MIXES``: "F32", "Q8_0", "Q4_K_M", ...): it sets
    ``general.file_type`` and every tensor's type as llama-quantize would choose it (with an
    imatrix when ``importance`` is given). ``types`` (GGUF name -> type) replaces that choice
    for the tensors it names: a run passes the types it persisted. Shapes are in torch order,
    ``shape[-1]`` being the row length. ``source_dir`` holds config.json and the tokenizer.
    ``pre`` forces ``tokenizer.ggml.pre``.
    """
    source_dir, out_path = Path(source_dir), Path(out_path)
    mix = get_mix(ftype)
    config = language_config(read_config(source_dir))
    mapper = TensorMapper(config)
    extra = mapper.extra_tensors()
    plan = tensor_plan(config, source_shapes(tensors), mix.name, importance is not None, types)
    if "token_embd.weight" not in plan.shapes:
        raise ValueError(f"{source_dir}: no embedding tensor found (expected model.embed_tokens)")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with writing(out_path):
        writer = _open_writer(source_dir, config, mapper, plan, mix.file_type, name, pre)
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = tqdm(total=len(plan.shapes), desc=f"GGUF {mix.name}", disable=not progress,
                       unit="tensor")  # fmt: skip
            for gname in plan.shapes:
                hf_name = plan.hf_of[gname]
                if gname in extra:
                    w, imp = extra[gname].float(), None
                else:
                    w = mapper.convert(hf_name, tensors.load([hf_name])[hf_name])
                    imp = importance(hf_name) if importance is not None else None
                if imp is not None:
                    imp = imp.detach().float().cpu()
                    if tuple(imp.shape) != (w.shape[-1],):
                        got, cols = tuple(imp.shape), w.shape[-1]
                        raise ValueError(f"tensor {gname}: importance {got}, expected ({cols},)")
                writer.write_tensor_data(encode(w.contiguous(), plan.types[gname], imp))
                bar.update(1)
            bar.close()
            writer.close()
            publish(tmp, out_path)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    log.info("wrote %s (%s, %d tensors)", out_path, mix.name, len(plan.shapes))
    return out_path
