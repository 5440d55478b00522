"""Which source names may be Hugging Face hub ids, and how a hub call that cannot work fails.

A name is looked up on the hub only when it is shaped like ``org/name``; a relative or absolute
path (``./x``, ``../x``, ``/x``, ``~/x``), a name with a file suffix (``data/x.jsonl``,
``m.gguf``) or any other shape is local only, so a typo in a path says "no such file or folder"
instead of waiting on the network. Offline, a hub call fails fast with a message saying so.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath

# Suffixes of the files a source can be; a name ending in one is a path, never a repo.
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".gguf", ".safetensors")
# The hub's repo id: one namespace, one name (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# Exceptions (by class name, anywhere in the cause chain) that mean the hub was not reached.
_NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "Timeout", "NetworkError", "ConnectionError")
PROBE_TIMEOUT_S = 5.0


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a file or folder on this machine."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in (".", "..")
        or PurePosixPath(name).suffix.lower() in LOCAL_SUFFIXES
    )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped like a hub repo id (``org/name``) and is not a local path."""
    return not looks_local(name) and _HUB_ID.fullmatch(name) is not None


def offline_by_setting() -> bool:
    """Whether the user told huggingface_hub / datasets to stay offline."""
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a failure to reach the network."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        names = {c.__name__ for c in type(cause).__mro__}
        if any(n.endswith(suffix) for n in names for suffix in _NETWORK_ERRORS):
            return True
        if type(cause).__name__ == "gaierror":
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def not_found(key: str, name: str, hint: str) -> str:
    """The message for a source that is neither a local path nor hub-shaped."""
    return (
        f"{key} {name!r}: no such file or folder ({os.path.abspath(os.path.expanduser(name))}); "
        f"{hint}"
    )


def failure(key: str, name: str, kind: str, err: BaseException, hint: str) -> str:
    """The message for a hub-shaped ``name`` that is not on this machine and not fetched."""
    if unreachable(err) or offline_by_setting():
        why = "the hub cannot be reached from this machine (offline)"
    else:
        why = f"{type(err).__name__}: {err}"
    return (
        f"{key} {name!r}: no such file or folder here, and as a hub {kind} id it could not be "
        f"fetched: {why}. {hint}"
    )


def probe(repo_id: str, repo_type: str, revision: str | None = None) -> None:
    """Raise what huggingface_hub raises when ``repo_id`` cannot be reached, within seconds:
    ``datasets`` alone retries a refused connection for about 25 s before it gives up. Skipped
    when the user set offline mode (the libraries then read their local cache)."""
    if offline_by_setting():
        return
    from huggingface_hub import HfApi

    HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=PROBE_TIMEOUT_S)
