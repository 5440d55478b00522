"""Plumbing shared by the safetensors writers and readers: nothing here knows a packing layout.

A writer streams a :class:`QuantizedRun` block by block: every quantized linear goes through
the format's ``pack`` callback, every other tensor (norms, biases, float linears) is kept in the
source model's dtype, then the non-block tensors (embeddings, final norm, ``lm_head``) are copied
from the source folder. Tensors go into shards of at most ``max_shard_bytes`` (with a
``model.safetensors.index.json`` when there is more than one), together with config.json and
the tokenizer files, all inside a temporary folder next to the target that is renamed when
complete, so an output folder that exists is whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from llmquant.quant.grid import GroupedCodes, IntGrid
from llmquant.quant.results import QuantizedRun

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
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
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# pack(module_name, codes) -> {suffix: tensor}, e.g. {"qweight": ..., "qzeros": ..., "scales": ...}
PackFn = Callable[[str, GroupedCodes], dict[str, torch.Tensor]]


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    return json.loads(path.read_text())


def model_dtype(config: dict) -> torch.dtype:
    """The dtype a config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"config.json: dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def matches_any(module_name: str, patterns: Iterable[str]) -> bool:
    """True if a pattern names the module: ``re:REGEX`` (re.match, as compressed-tensors does),
    the exact module path, or a dotted suffix of it (``lm_head``, ``mlp.down_proj``)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module_name):
                return True
        elif module_name == pattern or module_name.endswith("." + pattern):
            return True
    return False


# ---------------------------------------------------------------- reading safetensors folders


class TensorFolder:
    """Lazy access by name to the tensors of a safetensors folder (one file or sharded)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: self.folder / file for name, file in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.folder}: no *.safetensors files")
            self.file_of = {}
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self.file_of.update({name: file for name in handle.keys()})
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _handle(self, name: str):
        if name not in self.file_of:
            raise KeyError(f"{self.folder}: no tensor named {name!r}")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape_and_dtype(self, name: str) -> tuple[list[int], str]:
        tensor_slice = self._handle(name).get_slice(name)
        return list(tensor_slice.get_shape()), tensor_slice.get_dtype()


def detect_format(path: Path) -> str:
    """Which format a folder or file holds: "awq-gemm", "compressed-tensors", "hf" or "gguf"."""
    path = Path(path)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ValueError(f"{path}: a file that is not GGUF (expected a .gguf file or a folder)")
    quant = read_config(path).get("quantization_config") or {}
    method = quant.get("quant_method")
    if method is None:
        return "hf"
    if method == "awq" and str(quant.get("version", "gemm")).lower() == "gemm":
        return "awq-gemm"
    if method == "compressed-tensors":
        return "compressed-tensors"
    raise ValueError(f"{path}/config.json: unsupported quantization_config.quant_method {method!r}")


# ---------------------------------------------------------------- writing


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
        save_file(self.pending, str(self._part(len(self.shard_names))), metadata={"format": "pt"})
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


@dataclass
class ExportPlan:
    """What a writer learned while streaming: the grids of packed linears and the float ones."""

    dtype: torch.dtype
    quantized: dict[str, IntGrid] = field(default_factory=dict)  # module path -> grid
    float_linears: list[str] = field(default_factory=list)  # Linear modules kept in float

    def grids(self) -> list[IntGrid]:
        return sorted(
            set(self.quantized.values()), key=lambda g: (g.bits, g.group_size, g.symmetric)
        )


def _block_prefix(names: Iterable[str], index: int) -> str:
    """The dotted prefix shared by all tensors of a block, e.g. ``model.layers.3.``."""
    split = [name.split(".") for name in names]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if str(index) not in common:
        raise ValueError(f"block {index}: its tensors share no prefix naming the block ({common})")
    return ".".join(common[: common.index(str(index)) + 1]) + "."


def linear_module_names(config_dir: Path) -> list[str]:
    """Every ``nn.Linear`` of the model, from a skeleton on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _stream_tensors(
    run: QuantizedRun,
    shards: ShardWriter,
    plan: ExportPlan,
    pack: PackFn,
    ignore: list[str],
    dtype_of: Callable[[str], torch.dtype],
) -> None:
    prefixes: list[str] = []
    for block in tqdm(run.iter_blocks(), total=run.n_blocks, desc="export blocks"):
        prefixes.append(_block_prefix(block.tensors, block.index))
        packed_weights = set()
        for module, linear in block.linears.items():
            if linear.codes is None or matches_any(module, ignore):
                plan.float_linears.append(module)
                continue
            tensors = pack(module, linear.codes)
            shards.add({f"{module}.{suffix}": t for suffix, t in tensors.items()})
            plan.quantized[module] = linear.codes.grid
            packed_weights.add(f"{module}.weight")
        for name, tensor in block.tensors.items():
            if name in packed_weights:
                continue  # the dequantized copy of a packed weight
            if tensor.is_floating_point():
                tensor = tensor.to(dtype_of(name))
            shards.add({name: tensor})
        del block
    source = TensorFolder(run.source_dir)
    for name in source.names():
        if any(name.startswith(p) for p in prefixes):
            continue
        tensor = source.get(name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype_of(name))
        shards.add({name: tensor})


def _copy_side_files(source_dir: Path, folder: Path) -> None:
    for path in sorted(Path(source_dir).iterdir()):
        if path.is_file() and (path.name in COPIED_NAMES or path.name.startswith(COPIED_PREFIXES)):
            shutil.copy2(path, folder / path.name)


def write_quantized_folder(
    run: QuantizedRun,
    out_dir: Path,
    pack: PackFn,
    quantization_config: Callable[[ExportPlan], dict],
    ignore: Iterable[str],
    max_shard_bytes: int,
    float_dtype_for: Callable[[str, ExportPlan], torch.dtype] | None = None,
) -> Path:
    """Stream ``run`` into a Hugging Face folder at ``out_dir``; see the module docstring.

    ``float_dtype_for(name, plan)`` picks the dtype of an unpacked float tensor (default: the
    model's); a block's linears are in ``plan`` before its other tensors are written.
    ``quantization_config(plan)`` builds config.json's ``quantization_config`` once every block
    has been packed; it may raise ValueError, and then nothing is left behind.
    """
    out_dir = Path(out_dir)
    config = read_config(run.source_dir)
    plan = ExportPlan(dtype=model_dtype(config))
    ignore = list(ignore)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards = ShardWriter(tmp, max_shard_bytes)

        def dtype_of(name: str) -> torch.dtype:
            return float_dtype_for(name, plan) if float_dtype_for else plan.dtype

        _stream_tensors(run, shards, plan, pack, ignore, dtype_of)
        linears = linear_module_names(run.source_dir)
        block_linears = set(plan.quantized) | set(plan.float_linears)
        plan.float_linears += [name for name in linears if name not in block_linears]
        config["quantization_config"] = quantization_config(plan)
        files = shards.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(run.source_dir, tmp)
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
    log.info(
        "wrote %s: %d packed linears, %d float linears, %d file(s), %.1f MB",
        out_dir,
        len(plan.quantized),
        len(plan.float_linears),
        len(files),
        shards.total_bytes / 1e6,
    )
    return out_dir


# ---------------------------------------------------------------- reading quantized folders


def iter_dequantized(
    folder: Path,
    packed_suffixes: tuple[str, ...],
    unpack: Callable[[TensorFolder, str], torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of a plain HF state dict from a packed folder.

    ``packed_suffixes[0]`` marks a packed linear (e.g. ``qweight``); ``unpack(tensors, module)``
    returns its float weight [out, in]; the other packed suffixes are consumed by ``unpack``.
    """
    tensors = TensorFolder(folder)
    marker = "." + packed_suffixes[0]
    consumed = tuple("." + s for s in packed_suffixes)
    for name in tensors.names():
        if name.endswith(marker):
            module = name[: -len(marker)]
            yield f"{module}.weight", unpack(tensors, module)
        elif not name.endswith(consumed):
            yield name, tensors.get(name)


def require(tensors: TensorFolder, name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{tensors.folder}: tensor {name!r} is missing")
    return tensors.get(name)
