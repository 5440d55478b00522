"""Plumbing shared by the safetensors writers: nothing here knows a packing layout.

A writer streams a :class:`~llmquant.runfolder.RunFolder` block by block: every linear the
run's plan gives integer codes goes through the format's ``pack`` callback, every other tensor
(norms, biases, float linears) is kept in the source model's dtype, then the non-block tensors
(embeddings, final norm, ``lm_head``) are copied from the source folder. Tensors go into shards
of at most ``max_shard_bytes`` (with a ``model.safetensors.index.json`` when there is more than
one), together with config.json and the tokenizer files, all inside a temporary folder next to
the target that is renamed when complete, so an output folder that exists is whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from llmquant.cache import fsync_path
from llmquant.dtypes import DTYPES
from llmquant.errors import writing
from llmquant.quant.grid import GroupedCodes, IntGrid, quantize
from llmquant.runfolder import RunFolder
from llmquant.tensors import INDEX_FILE, config_dtype, read_config

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Files copied from the source folder next to the weights (tokenizer, generation, chat template).
COPIED_NAMES = {
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "spiece.model",
}
COPIED_PREFIXES = ("tokenizer",)

# pack(module_name, codes) -> {suffix: tensor}, e.g. {"qweight": ..., "qzeros": ..., "scales": ...}
PackFn = Callable[[str, GroupedCodes], dict[str, torch.Tensor]]


# ---------------------------------------------------------------- writing


# safetensors' dtype names, in the order of its Dtype enum: its writer puts wider dtypes first.
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}  # fmt: skip
_DTYPE_RANK = {name: rank for rank, name in enumerate(_SAFETENSORS_DTYPES.values())}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """The bytes ``safetensors.torch.save_file`` writes, streamed one tensor at a time:
    save_file first copies every tensor into one bytes object, so a 2 GB shard peaked at
    twice its size (5.6 GB RSS on the 7B export)."""
    names = sorted(
        tensors, key=lambda n: (-_DTYPE_RANK[_SAFETENSORS_DTYPES[tensors[n].dtype]], n)
    )
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the header is padded to 8 bytes, as save_file pads it
    with Path(path).open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            flat = tensors[name].detach().cpu().contiguous().reshape(-1)  # [numel]
            f.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


class ShardWriter:
    """Collects tensors into shards of at most ``max_bytes`` (one module never splits)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_names: list[list[str]] = []  # tensor names per written shard
        self.seen: set[str] = set()
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add the tensors of one module; they land in the same shard."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        for name, tensor in tensors.items():
            if name in self.seen:
                raise ValueError(f"tensor {name!r} written twice")
            self.seen.add(name)
            self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def _part(self, k: int) -> Path:
        return self.folder / f"part-{k:05d}.safetensors"

    def _flush(self) -> None:
        write_safetensors(self._part(len(self.shard_names)), self.pending, {"format": "pt"})
        self.shard_names.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index if needed."""
        if self.pending or not self.shard_names:
            self._flush()
        n = len(self.shard_names)
        if n == 1:
            os.replace(self._part(0), self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map: dict[str, str] = {}
        files = []
        for k, names in enumerate(self.shard_names):
            file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._part(k), self.folder / file)
            weight_map.update({name: file for name in names})
            files.append(file)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return files


def linear_module_names(config_dir: Path) -> list[str]:
    """Every ``nn.Linear`` of the model, from a skeleton on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _copy_side_files(source_dir: Path, folder: Path) -> None:
    for path in sorted(Path(source_dir).iterdir()):
        if path.is_file() and (path.name in COPIED_NAMES or path.name.startswith(COPIED_PREFIXES)):
            shutil.copy2(path, folder / path.name)


def packed_grids(run: RunFolder, grids: Mapping[str, IntGrid] | None = None) -> dict[str, IntGrid]:
    """Module path -> grid of every linear the run's plan gives integer codes (``grids``, a
    size target's allocation, overrides the plan's where it names a linear)."""
    return {
        module: (grids or {}).get(module, quantizer.grid)
        for module, quantizer in run.plan.quantizers.items()
        if quantizer.produces_codes
    }


def float_linears(run: RunFolder) -> list[str]:
    """Every ``nn.Linear`` of the model that is written in float (sorted)."""
    packed = packed_grids(run)
    return sorted(name for name in linear_module_names(run.source_dir) if name not in packed)


def _stream_tensors(
    run: RunFolder,
    shards: ShardWriter,
    pack: PackFn,
    dtype_of: Callable[[str], torch.dtype],
    grids: Mapping[str, IntGrid] | None = None,
) -> None:
    packed = packed_grids(run, grids)
    for block in tqdm(run.iter_blocks(), total=run.n_blocks, desc="export blocks"):
        packed_weights = set()
        for module, linear in block.linears.items():
            if module not in packed:
                continue
            if linear.codes is None:
                raise ValueError(f"{run.block_path(block.index)}: {module} has no integer codes")
            codes = linear.codes
            if codes.grid != packed[module]:
                # Allocated another grid than the searched one: quantized from the saved
                # transformed weight, which already holds the search's clipping.
                codes = quantize(linear.weight.float(), packed[module])
            tensors = pack(module, codes)
            shards.add({f"{module}.{suffix}": t for suffix, t in tensors.items()})
            packed_weights.add(f"{module}.weight")
        for name, tensor in block.tensors.items():
            if name in packed_weights:
                continue  # the dequantized copy of a packed weight
            if tensor.is_floating_point():
                tensor = tensor.to(dtype_of(name))
            shards.add({name: tensor})
        del block
    source = run.source()
    root = run.layers_path + "."
    for name in source.names():
        if name.startswith(root):
            continue
        tensor = source.get(name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype_of(name))
        shards.add({name: tensor})


def write_quantized_folder(
    run: RunFolder,
    out_dir: Path,
    pack: PackFn,
    quantization_config: dict,
    max_shard_bytes: int,
    float_dtype_for: Callable[[str], torch.dtype] | None = None,
    grids: Mapping[str, IntGrid] | None = None,
) -> Path:
    """Stream ``run`` into a Hugging Face folder at ``out_dir``; see the module docstring.

    ``float_dtype_for(name)`` picks the dtype of an unpacked float tensor (default: the
    model's); ``quantization_config`` goes into config.json; ``grids`` (module path -> grid)
    packs the linears it names on those grids.
    """
    out_dir = Path(out_dir)
    config = read_config(run.source_dir)
    dtype = DTYPES[run.dtype]
    if config_dtype(config) != dtype:  # exported in another dtype than the checkpoint's
        for key in {"torch_dtype", "dtype"} & set(config) or {"torch_dtype"}:
            config[key] = run.dtype
    with writing(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            shards = ShardWriter(tmp, max_shard_bytes)
            _stream_tensors(run, shards, pack, float_dtype_for or (lambda _name: dtype), grids)
            config["quantization_config"] = quantization_config
            files = shards.finish()
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            _copy_side_files(run.source_dir, tmp)
            fsync_path(tmp)
            if out_dir.exists():
                old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
                os.replace(out_dir, old)
                os.replace(tmp, out_dir)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("wrote %s: %d file(s), %.1f MB", out_dir, len(files), shards.total_bytes / 1e6)
    return out_dir
