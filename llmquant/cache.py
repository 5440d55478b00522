"""Where cached artifacts live, and the one way files are published (temporary name, rename)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """``$LLMQUANT_CACHE`` or ``~/.cache/llmquant``."""
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))


def _files(path: Path) -> list[Path]:
    """``path`` itself, or every file under the folder ``path`` (sorted)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def fsync_path(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to the disk."""
    path = Path(path)
    for target in [*_files(path), path] if path.is_dir() else [path]:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished file or folder ``tmp`` to ``path``, its bytes on disk first: a crash
    leaves the old version or the new one, never a renamed file with unwritten data."""
    fsync_path(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, fsync'ed before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    publish(tmp, path)


def file_identity(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of a file, or of every file in a folder (sorted): what a cache
    entry or a resumed run made from ``path`` is keyed on, so an edited or replaced checkpoint
    or text is never mistaken for the one the entry was made from (hashing gigabytes of
    weights on every run would cost more than the check is worth; size and mtime change with
    every rewrite)."""
    path = Path(path)
    return [
        (str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size,
         f.stat().st_mtime_ns)
        for f in _files(path)
    ]  # fmt: skip


def content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of every file of a folder with its relative name, read in
    1 MiB pieces: the key of anything made from a text file (an edited or emptied file must
    never reuse the windows of its earlier content)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in _files(path):
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with file.open("rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
    return digest.hexdigest()
