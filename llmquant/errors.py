"""One error hierarchy for every entry point: what a failure means decides its exit code.

- :class:`InputError`: the user's input is wrong (recipe, job, model, text, a file on disk);
  exit 2 with a message naming the file, key, tensor or layer and what was expected.
- :class:`EnvironmentFailure`: the machine lacks something (a tool, disk space); exit 1 with a
  message saying what to do, no traceback.
- anything else is a bug: exit 1 with a traceback.
"""

from __future__ import annotations


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
