"""The whole pipeline on tiny random models of every family in the architecture table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import FAMILIES, make_model, make_text_file
from transformers import AutoModelForCausalLM

from llmquant import pipeline
from llmquant.data import text as textdata
from llmquant.recipe import load_recipe
from llmquant.run import main

CONTRACT = {"recipe", "versions", "timings", "peak_rss_bytes", "outputs", "ppl", "eval"}


def tiny_recipe(tmp_path, model_dir, text, *extra):
    return load_recipe(
        None,
        [
            f"model.source={model_dir}",
            f"data.source={text}",
            "calibration.n_samples=4",
            "calibration.seq_len=32",
            "evaluation.n_windows=3",
            "evaluation.seq_len=32",
            "evaluation.batch_size=2",
            "quant.group_size=16",
            "awq.n_grid=4",
            "awq.clip_n_grid=4",
            *extra,
        ],
    )


def hf_perplexity(model_dir, windows):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(windows).logits.double()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logprobs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pipeline_runs_and_streamed_baseline_matches_transformers(tmp_path, family):
    model_dir = make_model(tmp_path / "model", family)
    text = make_text_file(tmp_path / "docs.jsonl")
    recipe = tiny_recipe(tmp_path, model_dir, text)
    report = pipeline.run(recipe, tmp_path / "out")
    assert CONTRACT <= set(report)
    assert set(report["ppl"]) == {"baseline", "quantized"}
    # Streaming block by block reproduces the whole model's forward pass.
    _, windows = pipeline.load_windows(recipe, model_dir, _tokenizer(model_dir))
    expected = hf_perplexity(model_dir, windows)
    assert abs(report["ppl"]["baseline"] - expected) / expected < 1e-5
    assert report["ppl"]["quantized"] != report["ppl"]["baseline"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["ppl"] == report["ppl"]
    assert (tmp_path / "out" / "report.md").is_file()


def test_quantized_stream_equals_model_with_dequantized_weights(tmp_path):
    """The quantized perplexity is that of the model whose weights the block files describe."""
    model_dir = make_model(tmp_path / "model", "llama")
    text = make_text_file(tmp_path / "docs.jsonl")
    recipe = tiny_recipe(tmp_path, model_dir, text, "quant.bits=3")
    report = pipeline.run(recipe, tmp_path / "out")
    model = _model_from_blocks(model_dir, tmp_path / "out" / "blocks")
    _, windows = pipeline.load_windows(recipe, model_dir, _tokenizer(model_dir))
    with torch.no_grad():
        logits = model(windows).logits.double()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, windows[:, 1:, None]).squeeze(-1)
    expected = math.exp(nll.mean().item())
    assert abs(report["ppl"]["quantized"] - expected) / expected < 1e-5


def test_w8_is_nearly_lossless(tmp_path):
    model_dir = make_model(tmp_path / "model", "llama")
    text = make_text_file(tmp_path / "docs.jsonl")
    w8 = pipeline.run(
        tiny_recipe(tmp_path, model_dir, text, "quant.bits=8", "awq.enabled=false"),
        tmp_path / "w8",
    )
    assert abs(w8["ppl"]["quantized"] / w8["ppl"]["baseline"] - 1) < 0.005


def _model_from_blocks(model_dir, blocks_dir):
    """The model whose weights the block files describe (int codes dequantized)."""
    from llmquant.quant.grid import dequantize
    from llmquant.runfolder import RunFolder

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    for block in RunFolder.open(blocks_dir).iter_blocks():
        state.update(block.tensors)
        for name, lin in block.linears.items():
            state[name + ".weight"] = dequantize(lin.codes)
    model.load_state_dict(state)
    return model


def test_w4_awq_lowers_the_kl_of_rtn_on_outlier_channels(tmp_path):
    """Whole pipeline: with a few large activation channels (AWQ's premise, as in real LLMs)
    the AWQ model's KL divergence to full precision is well below round-to-nearest's. (A random
    tiny model's perplexity is near its vocabulary size, so perplexity cannot show this.)"""
    from safetensors.torch import load_file, save_file

    model_dir = make_model(tmp_path / "model", "llama")
    state = load_file(str(model_dir / "model.safetensors"))
    for name in state:
        if "layernorm" in name:
            state[name][:4] *= 25.0
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    text = make_text_file(tmp_path / "docs.jsonl")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    kl = {}
    for awq in ("false", "true"):
        recipe = tiny_recipe(
            tmp_path, model_dir, text, f"awq.enabled={awq}", "awq.n_grid=10",
            "calibration.n_samples=8", "evaluation.n_windows=6", "export=[]",
        )  # fmt: skip
        pipeline.run(recipe, tmp_path / awq)
        model = _model_from_blocks(model_dir, tmp_path / awq / "blocks")
        _, windows = pipeline.load_windows(recipe, model_dir, _tokenizer(model_dir))
        with torch.no_grad():
            p = torch.log_softmax(base(windows).logits.double(), -1)
            q = torch.log_softmax(model(windows).logits.double(), -1)
        kl[awq] = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl["true"] < 0.8 * kl["false"], kl


def test_resume_refuses_a_folder_of_another_recipe(tmp_path):
    """(What resume loads and the bytes it writes: tests/test_resume.py.)"""
    model_dir = make_model(tmp_path / "model", "llama")
    text = make_text_file(tmp_path / "docs.jsonl")
    recipe = tiny_recipe(tmp_path, model_dir, text)
    pipeline.run(recipe, tmp_path / "out")
    other = tiny_recipe(tmp_path, model_dir, text, "quant.bits=3")
    with pytest.raises(pipeline.InputError, match=r"--resume .*\(quant changed\)"):
        pipeline.run(other, tmp_path / "out", resume=True)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _write_recipe(tmp_path, body: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return path


def test_cli_bad_group_size_exit_2_names_layer_and_nothing_written(tmp_path, capsys):
    model_dir = make_model(tmp_path / "model", "llama")
    text = make_text_file(tmp_path / "docs.jsonl")
    recipe = _write_recipe(
        tmp_path,
        f"model: {{source: {model_dir}}}\ndata: {{source: {text}}}\nquant: {{group_size: 48}}\n",
    )
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "48" in err and "[32, 64]" in err
    assert not out.exists()


def test_cli_unknown_key_exit_2(tmp_path, capsys):
    recipe = _write_recipe(tmp_path, "quant:\n  group: 64\n")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "quant.group" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_missing_model_exit_2(tmp_path, capsys):
    recipe = _write_recipe(tmp_path, "model: {source: ./no/such/model}\n")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "no/such/model" in capsys.readouterr().err


def test_cli_architecture_without_spec_exit_2(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=320)).save_pretrained(
        folder
    )
    text = make_text_file(tmp_path / "docs.jsonl")
    recipe = _write_recipe(tmp_path, f"model: {{source: {folder}}}\ndata: {{source: {text}}}\n")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_fails_clearly(monkeypatch):
    from llmquant.model.source import SourceError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="local folder"):
        resolve_model("someone/some-model")


def test_data_windows_are_disjoint_between_calibration_and_evaluation(tmp_path):
    docs = textdata.load_documents(str(make_text_file(tmp_path / "d.jsonl")))
    cal, ev = textdata.split_documents(docs, 0.5, 0)
    assert not set(cal) & set(ev)


@pytest.mark.parametrize(
    "sets, calibrated",
    [
        (("export=[{kind: compressed-tensors}]",), False),
        (("export=[{kind: gguf, types: [Q8_0]}]",), False),  # Q8_0 ignores importance
        (("export=[{kind: gguf, types: [Q4_K_M]}]",), True),  # the K-quants fit with it
        (("export=[{kind: gguf, types: [Q4_K_M], importance: false}]",), False),
        (("export=[{kind: gguf, types: [IQ4_XS]}]",), True),  # so do the IQ4 types
        (("quant.format=gguf", "quant.gguf_mix=Q4_K_M", "export=[]"), True),
    ],
)
def test_round_to_nearest_runs_only_the_passes_its_outputs_need(
    tmp_path, monkeypatch, sets, calibrated
):
    """RTN captures and runs the calibration stream only when a quantizer or writer reads its
    statistics; the int codes are then plain rounding of the source weights."""
    from safetensors.torch import load_file

    from llmquant.quant import grid
    from llmquant.runfolder import RunFolder

    model_dir = make_model(tmp_path / "model", "llama")
    text = make_text_file(tmp_path / "docs.jsonl")
    captured = []
    real_capture = pipeline.capture_inputs

    def capture(streamed, windows, batch_size):
        captured.append(windows.shape[0])
        return real_capture(streamed, windows, batch_size)

    monkeypatch.setattr(pipeline, "capture_inputs", capture)
    sets = tuple(s.replace("quant.format=gguf", "quant={format: gguf}") for s in sets)
    recipe = tiny_recipe(
        tmp_path, model_dir, text, "awq.enabled=false", "evaluation.enabled=false", *sets
    )
    report = pipeline.run(recipe, tmp_path / "out")
    assert captured == ([4] if calibrated else [])
    assert report["eval"]["calibration_used"] is calibrated
    losses = [b["block_loss"] for b in report["blocks"]]
    assert all((loss is not None) == calibrated for loss in losses)
    if recipe.quant.format == "int":
        source = load_file(str(model_dir / "model.safetensors"))
        run = RunFolder.open(tmp_path / "out" / "blocks")
        name = "model.layers.1.mlp.down_proj"
        expected = grid.quantize(source[name + ".weight"], run.plan.quantizers[name].grid)
        got = run.block(1).linears[name].codes
        assert torch.equal(got.codes, expected.codes) and torch.equal(got.zeros, expected.zeros)


def test_report_profile_accounts_for_the_block_loop(tmp_path):
    """report["profile"] splits the quantize step into its parts, and the parts add up to it."""
    model_dir = make_model(tmp_path / "model", "llama")
    text = make_text_file(tmp_path / "docs.jsonl")
    report = pipeline.run(tiny_recipe(tmp_path, model_dir, text, "export=[]"), tmp_path / "out")
    profile = report["profile"]
    for part in ("statistics pass", "scale search", "clip search", "quantize", "load block",
                 "propagation pass", "evaluation passes", "save block"):  # fmt: skip
        assert profile[part] > 0, part
    total = report["timings"]["quantize"]
    assert abs(sum(profile.values()) - total) < 0.05 * total + 0.01
    assert "Block loop by part" in (tmp_path / "out" / "report.md").read_text()
