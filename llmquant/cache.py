"""Where cached artifacts live, and the one way files are published (temporary name, rename)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LLMQUANT_CACHE`` or ``~/.cache/llmquant``."""
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, fsync'ed before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
