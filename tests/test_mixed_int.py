"""Int grids to a target size: the allocation, the compressed-tensors folder with one config group
per allocated grid, our reader against it, and transformers + compressed-tensors as its consumer.

A tiny llama (widths 256 and 512, so every default candidate fits) is searched under int4 g128
with ``quant.target_bpw`` between the candidates' sizes (int4 g128 about 4.28, int4 g32 about
5.13, int8 g128 about 8.31 bits per weight with float32 scales), so the linears get several grids.
"""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from export_fixtures import assert_close_rel, logits, model_from_state, read_json
from test_export_compressed_tensors import load_compressed, read_dequantized
from test_gguf_pipeline import llama256

from llmquant import pipeline
from llmquant.export.compressed_tensors import PACKED_SUFFIXES
from llmquant.formats.int_target import stored_bytes
from llmquant.quant.grid import IntGrid, dequantize, fake_quant
from llmquant.quant.quantizers import quantizer_from_spec
from llmquant.recipe import load_recipe
from llmquant.runfolder import RunFolder
from llmquant.tensors import open_safetensors

TARGET_BPW = 5.5
CT_EXPORT = "export=[{kind: compressed-tensors}]"


def _sets(tmp, model, extra: list[str]) -> list[str]:
    return [
        f"model.source={model}", f"data.source={tmp / 't.jsonl'}", "calibration.n_samples=4",
        "calibration.seq_len=32", "evaluation.n_windows=3", "evaluation.seq_len=32",
        "awq.n_grid=4", "awq.clip_n_grid=4", "quant.group_size=128", CT_EXPORT, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def int_target_run(tmp_path_factory):
    tiny_models.FAMILIES["llama256"] = lambda: llama256(2)
    tmp = tmp_path_factory.mktemp("int_target")
    model = tiny_models.make_model(tmp / "m", "llama256")
    tiny_models.make_text_file(tmp / "t.jsonl")
    recipe = load_recipe(
        "recipes/llama_w4.yaml", _sets(tmp, model, [f"quant.target_bpw={TARGET_BPW}"])
    )
    report = pipeline.run(recipe, tmp / "out")
    return tmp, tmp / "out", report, model


def _allocated(out) -> dict[str, IntGrid]:
    run = RunFolder.open(out / "blocks")
    grids = run.exports["compressed-tensors"]["grids"]
    return {m: quantizer_from_spec(spec).grid for m, spec in grids.items()}


def test_allocation_meets_the_target_with_several_grids(int_target_run):
    _, out, report, _ = int_target_run
    allocation = report["allocation"]["compressed-tensors"]
    assert allocation["linears_bytes"] <= allocation["budget_linears_bytes"]
    assert 5.0 < allocation["linears_bpw"] <= TARGET_BPW
    assert len(allocation["counts"]) >= 2, allocation["counts"]
    # persisted where the writer reads it, and the same as reported
    grids = _allocated(out)
    assert {m: g.describe() for m, g in grids.items()} == allocation["types"]
    errors: dict[str, dict[str, float]] = {}
    for block in report["blocks"]:
        # each block's errors in what they cost at the model's output (calib.downstream)
        gain = block["downstream_gain"]
        assert 0 < gain < float("inf"), block["block"]
        errors.update({m: {g: e * gain for g, e in by_grid.items()}
                       for m, by_grid in block["candidate_errors"].items()})  # fmt: skip
    assert set(errors) == set(grids)
    for module, by_grid in errors.items():
        assert by_grid["int8 g128 asym"] < by_grid["int4 g128 asym"], module
    assert allocation["total_error"] == pytest.approx(
        sum(errors[m][g.describe()] for m, g in grids.items())
    )
    assert "Mixed precision (compressed-tensors, quant.target_bpw 5.5)" in (
        out / "report.md"
    ).read_text()


def test_folder_has_one_config_group_per_grid_and_the_predicted_bytes(int_target_run):
    _, out, report, _ = int_target_run
    folder = out / "compressed-tensors"
    qc = read_json(folder / "config.json")["quantization_config"]
    grids = _allocated(out)
    by_group = {}
    for group in qc["config_groups"].values():
        w = group["weights"]
        grid = IntGrid(w["num_bits"], w["group_size"] or -1, w["symmetric"])
        by_group[grid.describe()] = sorted(group["targets"])
    assert len(by_group) == len(set(g.describe() for g in grids.values())) >= 2
    for name, targets in by_group.items():
        assert targets == sorted(m for m, g in grids.items() if g.describe() == name)
    # the packed tensors take exactly the bytes the allocation counted
    packed = 0
    for path in folder.glob("*.safetensors"):
        with open_safetensors(path) as f:
            for key in f.keys():
                if key.rsplit(".", 1)[-1] in PACKED_SUFFIXES:
                    t = f.get_tensor(key)
                    packed += t.numel() * t.element_size()
    allocation = report["allocation"]["compressed-tensors"]
    assert packed == allocation["linears_bytes"]
    shapes = {}
    for block in RunFolder.open(out / "blocks").iter_blocks():
        shapes.update({m: tuple(lin.weight.shape) for m, lin in block.linears.items()})
    assert packed == sum(stored_bytes(g, shapes[m], 4) for m, g in grids.items())


def test_reader_gives_each_linears_grid_of_its_saved_weight(int_target_run):
    """Re-quantized linears: the allocated grid's fake_quant of the block file's transformed
    weight; linears allocated the searched grid keep their saved codes."""
    _, out, _, _ = int_target_run
    state = read_dequantized(out / "compressed-tensors")
    run = RunFolder.open(out / "blocks")
    grids = _allocated(out)
    kept = requantized = 0
    for block in run.iter_blocks():
        for module, linear in block.linears.items():
            got = state[f"{module}.weight"]
            if grids[module] == linear.codes.grid:
                assert torch.equal(got, dequantize(linear.codes)), module
                kept += 1
            else:
                expected = fake_quant(linear.weight.float(), grids[module])
                assert torch.equal(got, expected), module
                requantized += 1
    assert kept and requantized, (kept, requantized)


def test_transformers_loads_the_mixed_folder_with_our_readers_logits(int_target_run):
    _, out, _, model = int_target_run
    folder = out / "compressed-tensors"
    state = read_dequantized(folder)
    expected = logits(model_from_state(model, state))
    assert_close_rel(logits(load_compressed(folder)), expected, 1e-5)


def test_resume_with_another_target_reallocates_without_block_work(int_target_run, monkeypatch):
    tmp, out, report, model = int_target_run
    first = report["allocation"]["compressed-tensors"]

    def no_block_work(*args, **kwargs):
        raise AssertionError("a saved block was quantized again")

    monkeypatch.setattr(pipeline, "quantize_block", no_block_work)
    recipe = load_recipe("recipes/llama_w4.yaml", _sets(tmp, model, ["quant.target_bpw=7"]))
    second = pipeline.run(recipe, out, resume=True)["allocation"]["compressed-tensors"]
    assert TARGET_BPW < second["linears_bpw"] <= 7
    assert second["total_error"] < first["total_error"]
    manifest = json.loads((out / "blocks" / "manifest.json").read_text())
    assert manifest["exports"]["compressed-tensors"]["target"] == {"quant.target_bpw": 7}
