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


def _tiny_gguf(tmp_path):
    from tiny_models import make_model

    from llmquant.export.gguf.writer import write_gguf
    from llmquant.tensors import SafetensorsFolder

    model = make_model(tmp_path / "model", "llama")
    return write_gguf(model, SafetensorsFolder(model), tmp_path / "m.gguf", "F32", progress=False)


@pytest.mark.parametrize("interrupt", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_an_aborted_gguf_conversion_leaves_no_cache_entry_and_is_redone(
    interrupt, tmp_path, monkeypatch
):
    import safetensors.torch

    from llmquant.model import source

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    gguf_path = _tiny_gguf(tmp_path)
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)  # the weights are on disk: midway
        raise interrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(type(interrupt)):
        source.convert_gguf(gguf_path)
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == [], "a half-made folder was left in the cache"

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    folder = source.convert_gguf(gguf_path)
    assert [p.name for p in models.iterdir()] == [folder.name]
    for name in ("config.json", "model.safetensors", "llmquant_source.json"):
        assert (folder / name).is_file()
    assert source.convert_gguf(gguf_path) == folder  # converted once, then reused


def test_a_truncated_gguf_is_named_before_conversion(tmp_path, monkeypatch):
    from llmquant.model import source

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    gguf_path = _tiny_gguf(tmp_path)
    data = gguf_path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 1000, 10, 0):
        gguf_path.write_bytes(data[:cut])
        with pytest.raises(InputError, match="m.gguf: truncated or not a GGUF file"):
            source.convert_gguf(gguf_path)
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.parametrize("mix", ["F32", "Q8_0", "Q4_K_M"])
def test_the_gguf_header_walk_finds_the_end_gguf_py_finds(mix, tmp_path):
    import gguf
    from tiny_models import make_model

    from llmquant.export.gguf.writer import write_gguf
    from llmquant.model.source import _gguf_data_end, check_gguf
    from llmquant.tensors import SafetensorsFolder

    model = make_model(tmp_path / "model", "llama")
    path = write_gguf(model, SafetensorsFolder(model), tmp_path / "m.gguf", mix, progress=False)
    reader = gguf.GGUFReader(path)
    expected = max(t.data_offset + int(t.n_bytes) for t in reader.tensors)
    data = path.read_bytes()
    assert _gguf_data_end(data, len(data)) == expected == len(data)
    check_gguf(path)  # a whole file passes
