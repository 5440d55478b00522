"""Resume, caches keyed on content, and a consistent output folder (tiny models, CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, make_documents, make_model, make_text_file
from transformers import LlamaConfig

from llmquant import pipeline
from llmquant.errors import InputError
from llmquant.recipe import load_recipe
from llmquant.run import main

REAL_QUANTIZE_BLOCK = pipeline.quantize_block
EXPORTS = "export=[{kind: compressed-tensors}, {kind: awq-gemm}]"


@pytest.fixture
def four_blocks(monkeypatch):
    base = FAMILIES["llama"]().to_dict()
    base.update(num_hidden_layers=4)
    monkeypatch.setitem(FAMILIES, "llama4", lambda: LlamaConfig(**base))
    return "llama4"


def _recipe(model, text, *extra):
    return load_recipe(
        None,
        [
            f"model.source={model}", f"data.source={text}", "calibration.n_samples=4",
            "calibration.seq_len=32", "evaluation.n_windows=2", "evaluation.seq_len=32",
            "evaluation.batch_size=2", "quant.group_size=16", "awq.n_grid=3",
            "awq.clip_n_grid=3", EXPORTS, *extra,
        ],
    )  # fmt: skip


def _export_bytes(out):
    return {
        str(p.relative_to(out)): p.read_bytes()
        for name in ("compressed-tensors", "awq-gemm")
        for p in sorted((out / name).rglob("*"))
        if p.is_file()
    }


class Killed(Exception):
    pass


def _counting(monkeypatch, kill_at=None):
    """Patch the block quantizer: record the blocks it is called for, raise at ``kill_at``."""
    calls = []
    real = REAL_QUANTIZE_BLOCK

    def quantize_block(index, *args, **kwargs):
        if index == kill_at:
            raise Killed(f"killed before block {index}")
        calls.append(index)
        return real(index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_block", quantize_block)
    return calls


@pytest.fixture
def reference(tmp_path, four_blocks):
    model = make_model(tmp_path / "model", four_blocks)
    text = make_text_file(tmp_path / "docs.jsonl")
    recipe = _recipe(model, text)
    report = pipeline.run(recipe, tmp_path / "reference")
    return recipe, report, _export_bytes(tmp_path / "reference")


def test_resume_after_a_kill_loads_the_saved_blocks_and_writes_the_same_bytes(
    tmp_path, monkeypatch, reference
):
    recipe, first, expected = reference
    out = tmp_path / "out"
    _counting(monkeypatch, kill_at=2)
    with pytest.raises(Killed):
        pipeline.run(recipe, out)
    assert not (out / "report.json").exists()
    saved = {i: (out / "blocks" / f"block_{i:04d}.safetensors").stat() for i in (0, 1)}
    calls = _counting(monkeypatch)
    second = pipeline.run(recipe, out, resume=True)
    assert calls == [2, 3]  # blocks 0 and 1 were loaded, not recomputed
    for i, before in saved.items():
        after = (out / "blocks" / f"block_{i:04d}.safetensors").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _export_bytes(out) == expected
    assert second["ppl"] == first["ppl"]


def test_a_damaged_block_file_is_recomputed_on_resume_with_a_warning(
    tmp_path, monkeypatch, reference, caplog
):
    recipe, _, expected = reference
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    damaged = out / "blocks" / "block_0001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        pipeline.run(recipe, out, resume=True)
    assert calls == [1]
    assert any(str(damaged) in r.message and "truncated" in r.message for r in caplog.records)
    assert _export_bytes(out) == expected


def test_a_block_file_of_another_run_is_not_used(tmp_path, monkeypatch, reference):
    """Block files carry the run's fingerprint: one copied in from another recipe is redone."""
    recipe, _, _ = reference
    other = tmp_path / "other"
    symmetric = ("quant.symmetric=true", "export=[{kind: compressed-tensors}]")
    pipeline.run(_recipe(recipe.model.source, recipe.data.source, *symmetric), other)
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    (out / "blocks" / "block_0002.safetensors").write_bytes(
        (other / "blocks" / "block_0002.safetensors").read_bytes()
    )
    calls = _counting(monkeypatch)
    pipeline.run(recipe, out, resume=True)
    assert calls == [2]


def test_a_damaged_manifest_on_resume_is_exit_2_naming_it(tmp_path, reference, capsys):
    recipe, _, _ = reference
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    manifest = out / "blocks" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    sets = [f"model.source={recipe.model.source}", f"data.source={recipe.data.source}",
            "calibration.n_samples=4", "calibration.seq_len=32", "evaluation.n_windows=2",
            "evaluation.seq_len=32", "evaluation.batch_size=2", "quant.group_size=16",
            "awq.n_grid=3", "awq.clip_n_grid=3", EXPORTS]  # fmt: skip
    argv = ["recipes/llama_w4.yaml", "--out", str(out), "--resume"]
    code = main([*argv, *(x for s in sets for x in ("--set", s))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(manifest) in err and "damaged" in err and "--out" in err


def test_a_replaced_model_makes_resume_refuse(tmp_path, reference, four_blocks):
    recipe, _, _ = reference
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    make_model(recipe.model.source, four_blocks, seed=1)  # same path, other weights
    with pytest.raises(InputError, match=r"--resume .*the model's weight, config or tokenizer"):
        pipeline.run(recipe, out, resume=True)


def test_without_resume_finished_blocks_are_discarded_with_a_warning(
    tmp_path, reference, caplog
):
    recipe, _, _ = reference
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    with caplog.at_level(logging.WARNING):
        pipeline.run(recipe, out)
    assert any("4 finished block(s)" in r.message and "--resume" in r.message
               for r in caplog.records)  # fmt: skip


def test_a_failed_run_leaves_no_report_beside_its_files(tmp_path, monkeypatch, reference):
    recipe, _, _ = reference
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    assert (out / "report.json").is_file()
    _counting(monkeypatch, kill_at=3)
    with pytest.raises(Killed):
        pipeline.run(recipe, out, resume=False)
    assert not (out / "report.json").exists() and not (out / "report.md").exists()


def test_an_edited_text_file_makes_new_windows(tmp_path):
    from transformers import AutoTokenizer

    model = make_model(tmp_path / "model", "llama")
    text = make_text_file(tmp_path / "docs.jsonl")
    recipe = _recipe(model, text)
    tokenizer = AutoTokenizer.from_pretrained(model)
    first = pipeline.load_windows(recipe, model, tokenizer)
    original = text.read_text()
    edited = [json.dumps({"text": doc}) for doc in make_documents(400, seed=5)]
    text.write_text("\n".join(edited) + "\n")  # the same path and name, other documents
    second = pipeline.load_windows(recipe, model, tokenizer)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    text.write_text(original)
    third = pipeline.load_windows(recipe, model, tokenizer)
    assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])


def test_an_edited_calibration_text_makes_resume_refuse(tmp_path, reference):
    """Saved blocks were calibrated on the old text: resuming on the edited one is another run."""
    recipe, _, _ = reference
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    text = recipe.data.source
    edited = [json.dumps({"text": doc}) for doc in make_documents(400, seed=7)]
    Path(text).write_text("\n".join(edited) + "\n")
    with pytest.raises(InputError, match=r"--resume .*calibration text's content \(data\.source"):
        pipeline.run(recipe, out, resume=True)


def test_an_edited_readme_beside_the_model_does_not_block_resume(tmp_path, reference, monkeypatch):
    recipe, _, _ = reference
    out = tmp_path / "out"
    pipeline.run(recipe, out)
    (Path(recipe.model.source) / "README.md").write_text("notes the user keeps beside it")
    calls = _counting(monkeypatch)
    pipeline.run(recipe, out, resume=True)
    assert calls == []
