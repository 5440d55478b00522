"""One tensor source interface, one implementation per storage, one config reader, one dtype table.

A :class:`TensorSource` answers names, shapes and loads by name, whatever holds the tensors: a
Hugging Face safetensors folder (:class:`SafetensorsFolder`, one file or sharded), a packed
quantized folder whose linears are unpacked on demand (:class:`PackedFolder`, with the format's
unpacking), or a run folder (``llmquant.runfolder.RunTensors``). The streamed model, the
writers and the evaluator read through this interface only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from llmquant.dtypes import dtype_named
from llmquant.errors import InputError

INDEX_FILE = "model.safetensors.index.json"


def read_config(folder: Path) -> dict:
    """config.json of a Hugging Face folder; InputError naming the file when it is missing."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


def language_config(config: dict) -> dict:
    """The language model's keys: multimodal wrappers keep them under ``text_config``."""
    return {**config, **config["text_config"]} if "text_config" in config else config


def config_dtype(config: dict) -> torch.dtype:
    """The dtype a config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    return dtype_named(config.get("dtype") or config.get("torch_dtype") or "float32", "config.json")


class TensorSource(Protocol):
    """Tensors by Hugging Face name: what the streamed model, writers and evaluator read."""

    def names(self) -> list[str]:
        """Every tensor name, in storage order."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors called ``names``; KeyError naming the storage for an unknown name."""


def iter_tensors(source: TensorSource, names: Iterable[str] | None = None) -> Iterator:
    """``(name, tensor)`` one at a time in ``names`` order (default: the source's order)."""
    for name in source.names() if names is None else names:
        yield name, source.load([name])[name]


def load_all(source: TensorSource) -> dict[str, torch.Tensor]:
    """Every tensor of ``source`` (tests and small models only: this is the whole model)."""
    return dict(iter_tensors(source))


def open_safetensors(path: Path):
    """``safe_open`` of ``path``; InputError naming the file when it is missing, cut short or
    not a safetensors file at all (the library's own error names neither file nor remedy)."""
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except SafetensorError as err:
        raise InputError(
            f"{path}: truncated or not a safetensors file ({err}); re-download or re-convert it"
        ) from None


class SafetensorsFolder:
    """The tensors of a folder of ``*.safetensors`` files (with or without an index).

    Every file's header is read when the folder is opened, so a damaged file is named before
    any work, not when its block comes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        self.file_of: dict[str, Path] = {}
        if index.is_file():
            by_file: dict[str, list[str]] = {}
            for name, file in _weight_map(index).items():
                by_file.setdefault(file, []).append(name)
            for file in sorted(by_file):
                with open_safetensors(self.folder / file):
                    pass  # the header is whole: the file's tensors are readable
                self.file_of.update({name: self.folder / file for name in sorted(by_file[file])})
        else:
            for path in sorted(self.folder.glob("*.safetensors")):
                with open_safetensors(path) as f:
                    self.file_of.update({name: path for name in f.keys()})
        if not self.file_of:
            raise InputError(f"{self.folder}: no *.safetensors weights found")

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _file(self, name: str) -> Path:
        if name not in self.file_of:
            raise KeyError(f"{self.folder}: no tensor named {name!r}")
        return self.file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        with open_safetensors(self._file(name)) as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors spells it ("F32", "BF16", "I32", ...)."""
        with open_safetensors(self._file(name)) as f:
            return f.get_slice(name).get_dtype()

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read ``names`` grouped by file, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file(name), []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with open_safetensors(path) as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.load([name])[name]

    def require(self, name: str) -> torch.Tensor:
        """``get`` for a tensor a format needs: InputError naming the folder when it is missing."""
        if name not in self:
            raise InputError(f"{self.folder}: tensor {name!r} is missing")
        return self.get(name)


def _weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> file of a ``model.safetensors.index.json``; InputError naming it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(
            f"{index}: not a safetensors index ({err!r}; expected JSON with a weight_map)"
        ) from None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: weight_map is not a mapping of tensor name to file")
    return weight_map


# unpack(folder, module path) -> float32 weight [out, in] of one packed linear
Unpack = Callable[[SafetensorsFolder, str], torch.Tensor]


class PackedFolder:
    """A quantized folder seen as the plain model: ``M.weight`` of a packed linear is unpacked
    on demand by the format's ``unpack``; the packed tensors themselves are hidden."""

    def __init__(self, folder: Path, packed_suffixes: tuple[str, ...], unpack: Unpack) -> None:
        """``packed_suffixes[0]`` marks a packed linear (``qweight``, ``weight_packed``)."""
        self.folder = SafetensorsFolder(folder)
        self.unpack = unpack
        marker = "." + packed_suffixes[0]
        consumed = tuple("." + s for s in packed_suffixes)
        self.packed: dict[str, str] = {}  # "M.weight" -> "M"
        self.order: list[str] = []  # storage order, a packed linear where its marker is
        for name in self.folder.names():
            if name.endswith(marker):
                module = name.removesuffix(marker)
                self.packed[module + ".weight"] = module
                self.order.append(module + ".weight")
            elif not name.endswith(consumed):
                self.order.append(name)

    def names(self) -> list[str]:
        return list(self.order)

    def __contains__(self, name: str) -> bool:
        return name in self.packed or name in self.folder

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.packed:
            return tuple(self.load([name])[name].shape)
        return self.folder.shape(name)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        plain = []
        for name in names:
            if name in self.packed:
                out[name] = self.unpack(self.folder, self.packed[name])
            else:
                plain.append(name)
        out.update(self.folder.load(plain))
        return out
