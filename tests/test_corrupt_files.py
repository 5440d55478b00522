"""Corrupt files and faults beyond the bad-input table: a full disk however a library reports
it, and a GGUF conversion that stops midway (issue 12, item 3)."""

from __future__ import annotations

import errno

import pytest

from llmquant.cli import run_command
from llmquant.errors import EnvironmentFailure, InputError, is_disk_full, writing


@pytest.mark.parametrize(
    "err",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        # safetensors wraps the OS error in its own type, with the errno only in the text
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_is_recognised_however_reported(err):
    assert is_disk_full(err)
    with pytest.raises(EnvironmentFailure, match="out/x: no space left on device.*free space"):
        with writing("out/x"):
            raise err


@pytest.mark.parametrize(
    "err", [OSError(errno.EACCES, "Permission denied"), ValueError("scale out of range")]
)
def test_other_errors_pass_through_writing(err):
    assert not is_disk_full(err)
    with pytest.raises(type(err)):
        with writing("out/x"):
            raise err


def test_input_errors_keep_their_meaning_inside_writing():
    with pytest.raises(InputError):
        with writing("out/x"):
            raise InputError("No space left on device is a tensor name here")


def test_run_command_reports_a_full_disk_outside_the_writers_by_its_file(capsys):
    def body() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/blocks/block_0003.tmp")

    assert run_command(body) == 1
    err = capsys.readouterr().err
    assert "runs/x/blocks/block_0003.tmp: no space left on device" in err
    assert "Traceback" not in err
