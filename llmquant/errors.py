"""One error hierarchy for every entry point: what a failure means decides its exit code.

- :class:`InputError`: the user's input is wrong (recipe, job, model, text, a file on disk);
  exit 2 with a message naming the file, key, tensor or layer and what was expected.
- :class:`EnvironmentFailure`: the machine lacks something (a tool, disk space); exit 1 with a
  message saying what to do, no traceback.
- anything else is a bug: exit 1 with a traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LlmquantError(Exception):
    """Base of the errors an entry point reports by message alone."""

    exit_code = 1


class InputError(LlmquantError, ValueError):
    """Bad input; the message names what was wrong and what would work."""

    exit_code = 2


class EnvironmentFailure(LlmquantError):
    """A missing tool, a full disk: not the input's fault, not a bug."""

    exit_code = 1


class NonFiniteResult(LlmquantError):
    """A NaN or Inf in something llmquant computed (a scale, a block result, a perplexity): an
    internal failure, reported with the block and linear it came from; exit 1."""

    exit_code = 1


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that wrap the OS error in their own type (safetensors' SafetensorError) spell it.
_DISK_FULL_TEXTS = (
    "No space left on device",
    "Disk quota exceeded",
    f"os error {errno.ENOSPC})",
    f"os error {errno.EDQUOT})",
)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a full disk or an exhausted quota, however the library reports it."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in _DISK_FULL_ERRNOS
    return any(text in str(err) for text in _DISK_FULL_TEXTS)


def disk_full_failure(path: Path | str | None) -> EnvironmentFailure:
    """The one message of a full disk: what was being written and what to do."""
    where = f"{path}: " if path else ""
    return EnvironmentFailure(
        f"{where}no space left on device while writing; free space on that disk (or point --out "
        "or $LLMQUANT_CACHE at another one) and run again (a run's finished blocks are kept: "
        "add --resume)"
    )


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Report a full disk met while writing ``path`` as :class:`EnvironmentFailure` naming it.

    The writer inside must remove its temporary files itself (it knows them); this only gives
    the failure its meaning, which a bare OSError from ``write()`` lacks (it names no file).
    """
    try:
        yield
    except LlmquantError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_failure(path) from err
        raise
