"""Evaluation jobs: metrics against direct computations, streaming, guards and --check."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from tiny_models import make_model, make_text_file
from transformers import AutoModelForCausalLM

from llmquant import eval as eval_cli
from llmquant import pipeline
from llmquant.evaluate.job import Job, ModelEntry, Windows, evaluation_windows, run_job
from llmquant.evaluate.metrics import token_kld
from llmquant.evaluate.streamed import final_hidden, window_logits
from llmquant.model.stream import StreamedModel
from llmquant.recipe import RecipeError, TextSource, load_recipe


@pytest.fixture()
def setup(tmp_path):
    model_a = make_model(tmp_path / "a", "llama", seed=0)
    model_b = make_model(tmp_path / "b", "llama", seed=1)
    text = make_text_file(tmp_path / "docs.jsonl")
    return tmp_path, model_a, model_b, text


def _job(text, baseline, models, **extra):
    return Job(
        name="t",
        text=TextSource(source=str(text)),
        windows=Windows(n_windows=3, seq_len=24, batch_size=2),
        baseline=ModelEntry(name="base", path=str(baseline)),
        models=[ModelEntry(name=n, path=str(p)) for n, p in models],
        **extra,
    )


def _hf_logits(model_dir, windows):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(windows).logits


def test_streamed_equals_in_memory(setup):
    _, model_a, _, text = setup
    windows, _ = evaluation_windows(_job(text, model_a, []), model_a)
    streamed = StreamedModel(model_a)
    got = torch.cat(list(window_logits(streamed, final_hidden(streamed, windows, 2))), dim=0)
    ref = _hf_logits(model_a, windows)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_nll_kld_top1_match_direct_computation(setup):
    _, model_a, model_b, text = setup
    job = _job(text, model_a, [("same", model_a), ("other", model_b)])
    results = run_job(job)
    windows, _ = evaluation_windows(job, model_a)
    la, lb = _hf_logits(model_a, windows).double(), _hf_logits(model_b, windows).double()
    # Hand NLL for the baseline.
    total, count = 0.0, 0
    for w in range(windows.shape[0]):
        for t in range(windows.shape[1] - 1):
            row = la[w, t]
            total -= (row[windows[w, t + 1]] - torch.logsumexp(row, 0)).item()
            count += 1
    assert results["models"]["base"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert results["models"]["same"]["kld_mean"] == pytest.approx(0.0, abs=1e-9)
    assert results["models"]["same"]["top1_agreement"] == 1.0
    pa, pb = torch.softmax(la[:, :-1], -1), torch.softmax(lb[:, :-1], -1)
    kld = (pa * (pa.log() - pb.log())).sum(-1)
    assert results["models"]["other"]["kld_mean"] == pytest.approx(kld.mean().item(), rel=1e-6)
    assert results["models"]["other"]["kld_median"] == pytest.approx(kld.median().item(), rel=1e-6)
    agree = (la[:, :-1].argmax(-1) == lb[:, :-1].argmax(-1)).double().mean().item()
    assert results["models"]["other"]["top1_agreement"] == pytest.approx(agree)
    assert len(results["models"]["other"]["window_kld"]) == 3


def test_token_kld_zero_for_identical():
    logits = torch.randn(2, 6, 11)
    assert token_kld(logits, logits).abs().max() < 1e-12


def _quantized_run(tmp_path, model_dir, text, seed=0):
    recipe = load_recipe(
        None,
        [
            f"model.source={model_dir}",
            f"data.source={text}",
            f"data.seed={seed}",
            "calibration.n_samples=4",
            "calibration.seq_len=24",
            "evaluation.n_windows=3",
            "evaluation.seq_len=24",
            "quant.group_size=16",
            "awq.n_grid=3",
            "awq.clip=false",
            "export=[{kind: compressed-tensors}, {kind: awq-gemm}]",
        ],
    )
    out = tmp_path / "run"
    report = pipeline.run(recipe, out)
    return out, report


def test_job_over_exports_matches_pipeline_and_writes_outputs(setup, capsys):
    tmp_path, model_a, _, text = setup
    run_dir, report = _quantized_run(tmp_path, model_a, text)
    job = {
        "name": "tiny",
        "text": {"source": str(text)},
        "windows": {"n_windows": 3, "seq_len": 24},
        "baseline": {"name": "fp32", "path": str(model_a)},
        "models": [
            {"name": "ct", "path": str(run_dir / "compressed-tensors")},
            {"name": "awq", "path": str(run_dir / "awq-gemm")},
        ],
        "results": str(tmp_path / "out" / "results.json"),
    }
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    assert eval_cli.main([str(job_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ppl_kld_vs_bpw.png" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # Same windows as the pipeline's evaluation: our readers reproduce its quantized model.
    assert results["models"]["fp32"]["ppl"] == pytest.approx(report["ppl"]["baseline"], rel=1e-6)
    for name in ("ct", "awq"):
        assert results["models"][name]["ppl"] == pytest.approx(report["ppl"]["quantized"], rel=1e-5)
        assert results["models"][name]["bpw"] < results["models"]["fp32"]["bpw"]
    assert (tmp_path / "out" / "ppl_kld_vs_bpw.png").stat().st_size > 1000
    # --check re-runs and passes; a tampered committed value fails.
    assert eval_cli.main(["--check", str(job_path)]) == 0
    results["models"]["ct"]["ppl"] *= 1.05
    (tmp_path / "out" / "results.json").write_text(json.dumps(results))
    assert eval_cli.main(["--check", str(job_path)]) == 1


def test_calibration_overlap_is_refused_then_flagged(setup):
    tmp_path, model_a, _, text = setup
    run_dir, _ = _quantized_run(tmp_path, model_a, text, seed=0)
    # A different split seed puts some of the run's calibration documents in the eval part.
    job = _job(text, model_a, [("ct", run_dir / "compressed-tensors")])
    job = job.model_copy(update={"text": TextSource(source=str(text), seed=7)})
    with pytest.raises(RecipeError, match="calibration"):
        run_job(job)
    flagged = run_job(job.model_copy(update={"allow_calibration_overlap": True}))
    assert flagged["models"]["ct"]["overlap"] > 0
