"""What the bad-input table cannot show: inputs that are accepted with a warning (logged before
the first block), the order of the evaluator's checks, a GGUF baseline that evaluates, and
which names are tried on the hub."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
from tiny_models import make_model, make_text_file

from llmquant import eval as eval_cli
from llmquant import pipeline
from llmquant.data import text as textdata
from llmquant.evaluate import job as jobmod
from llmquant.hub import is_hub_id
from llmquant.recipe import load_recipe

TINY = [
    "calibration.n_samples=2", "calibration.seq_len=16", "evaluation.n_windows=2",
    "evaluation.seq_len=16", "quant.group_size=16", "awq.n_grid=2", "awq.clip_n_grid=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return make_model(root / "model", "llama"), make_text_file(root / "docs.jsonl")


def test_gguf_export_of_an_int_run_is_accepted_with_a_warning_before_the_first_block(
    world, tmp_path, monkeypatch, caplog
):
    model, text = world
    recipe = load_recipe(
        None,
        [*TINY, f"model.source={model}", f"data.source={text}", "evaluation.enabled=false",
         "export=[{kind: gguf, types: [Q8_0]}]"],
    )  # fmt: skip
    seen_at_first_block: list[str] = []
    real = pipeline.quantize_block

    def spy(*args, **kwargs):
        if not seen_at_first_block:
            seen_at_first_block.extend(
                r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            )
            seen_at_first_block.append("(first block)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_block", spy)
    with caplog.at_level(logging.WARNING, logger="llmquant"):
        report = pipeline.run(recipe, tmp_path / "out")
    warned = [m for m in seen_at_first_block if "re-quantizing" in m]
    assert warned, seen_at_first_block
    assert "export[0].types[0] (gguf Q8_0)" in warned[0] and "int4 g16 asym" in warned[0]
    assert "quant.format: gguf" in warned[0]  # says how to get a file searched under Q8_0
    assert any(p.endswith("-Q8_0.gguf") for p in report["outputs"].values())


def test_gguf_export_of_the_searched_mix_does_not_warn(world, tmp_path, caplog):
    model, text = world
    recipe = load_recipe(
        None,
        [*TINY[:4], f"model.source={model}", f"data.source={text}", "evaluation.enabled=false",
         "awq.enabled=false", "quant={format: gguf, gguf_mix: Q8_0}",
         "export=[{kind: gguf, types: [Q8_0]}]"],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="llmquant"):
        pipeline.run(recipe, tmp_path / "out")
    assert not [r for r in caplog.records if "re-quantizing" in r.getMessage()]


def test_empty_recipe_file_says_it_runs_on_defaults(tmp_path, caplog):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    with caplog.at_level(logging.WARNING, logger="llmquant"):
        recipe = load_recipe(path)
    assert recipe == load_recipe(None)
    assert any(str(path) in r.getMessage() and "default" in r.getMessage() for r in caplog.records)


def test_model_paths_are_checked_before_the_baseline_pass(world, tmp_path, monkeypatch, capsys):
    model, text = world

    def baseline_pass(*args, **kwargs):
        raise AssertionError("the baseline pass ran before the model paths were checked")

    monkeypatch.setattr(jobmod, "_baseline_hidden", baseline_pass)
    argv = ["--baseline", str(model), "--text", str(text), "--n-windows", "2", "--seq-len", "16",
            "--model", f"ok={model}", "--model", f"gone={tmp_path / 'gone'}",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "models[1].path" in err and "gone" in err
    assert not (tmp_path / "out").exists()


def test_gguf_file_as_baseline_evaluates(world, tmp_path):
    from llmquant.export.gguf.writer import write_gguf
    from llmquant.tensors import SafetensorsFolder

    model, text = world
    gguf_path = write_gguf(model, SafetensorsFolder(model), tmp_path / "m.gguf", "F32",
                           progress=False)  # fmt: skip
    out = tmp_path / "out"
    argv = ["--baseline", str(gguf_path), "--text", str(text), "--n-windows", "2",
            "--seq-len", "16", "--model", f"hf={model}", "--out", str(out)]  # fmt: skip
    assert eval_cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    base = results["models"]["baseline"]
    assert math.isfinite(base["ppl"]) and base["bytes"] == gguf_path.stat().st_size
    # F32 GGUF and its source folder are the same model: the same perplexity.
    assert results["models"]["hf"]["ppl"] == pytest.approx(base["ppl"], rel=1e-4)


@pytest.mark.parametrize(
    ("name", "hub"),
    [
        ("HuggingFaceTB/SmolLM2-135M", True),
        ("models/m", True),
        ("m", False),
        ("./models/m", False),
        ("../m", False),
        ("/abs/m", False),
        ("~/m", False),
        ("data/x.jsonl", False),
        ("org/m.gguf", False),
        ("org/model.safetensors", False),
        ("a/b/c", False),
        ("org/", False),
    ],
)
def test_only_org_name_shapes_are_hub_ids(name, hub):
    assert is_hub_id(name) is hub


def test_hub_shaped_dataset_that_cannot_be_fetched_fails_in_seconds():
    started = time.perf_counter()
    with pytest.raises(textdata.DataError, match="no-such-text"):
        textdata.load_documents("llmquant-no-such-org/no-such-text")
    # datasets alone retries a refused connection for about 25 s.
    assert time.perf_counter() - started < 15
