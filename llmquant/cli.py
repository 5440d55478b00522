"""The wrapper both commands run in: logging set-up and the mapping of errors to exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from llmquant.errors import LlmquantError, disk_full_failure, is_disk_full

log = logging.getLogger("llmquant")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_command(body: Callable[[], int]) -> int:
    """Run ``body``; map :mod:`llmquant.errors` to their exit codes, a full disk to
    EnvironmentFailure's, anything else to 1 with a traceback."""
    try:
        return body()
    except LlmquantError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if is_disk_full(err):  # a writer that did not name its file: what the OS said
            failure = disk_full_failure(getattr(err, "filename", None))
            print(f"error: {failure}", file=sys.stderr)
            return failure.exit_code
        log.exception("internal failure (a bug in llmquant; the traceback says where)")
        return 1
