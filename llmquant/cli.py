"""The wrapper both commands run in: logging set-up and the mapping of errors to exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from llmquant.errors import LlmquantError

log = logging.getLogger("llmquant")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_command(body: Callable[[], int]) -> int:
    """Run ``body``; map :mod:`llmquant.errors` to their exit codes, anything else to 1."""
    try:
        return body()
    except LlmquantError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        log.exception("internal failure (a bug in llmquant; the traceback says where)")
        return 1
