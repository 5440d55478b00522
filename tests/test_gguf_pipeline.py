"""AWQ searched under the GGML types of a llama.cpp mix, exported to GGUF (DESIGN principle 4)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import tiny_models
import torch
from tiny_models import make_model, make_text_file
from transformers import LlamaConfig

from llmquant import pipeline
from llmquant.export.gguf.mixes import tensor_types
from llmquant.export.gguf.names import TensorMapper, arch_info
from llmquant.quant.ggml import get_ggml_type
from llmquant.quant.quantizers import GgmlQuantizer
from llmquant.recipe import load_recipe
from llmquant.runfolder import RunFolder


def llama256(layers: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, bos_token_id=0,
        eos_token_id=1, tie_word_embeddings=True,
    )  # fmt: skip


def run_gguf_recipe(tmp: Path, family: str, extra: list[str]) -> tuple[Path, dict, Path]:
    """The GGUF recipe on the tiny model ``family`` with small settings: (out, report, model)."""
    model = make_model(tmp / "m", family)
    text = make_text_file(tmp / "t.jsonl")
    recipe = load_recipe(
        "recipes/llama_w4_gguf.yaml",
        [
            f"model.source={model}", f"data.source={text}", "calibration.n_samples=4",
            "calibration.seq_len=32", "evaluation.n_windows=3", "evaluation.seq_len=32",
            "awq.n_grid=4", "awq.clip_n_grid=4", *extra,
        ],
    )  # fmt: skip
    report = pipeline.run(recipe, tmp / "out")
    return tmp / "out", report, model


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    tiny_models.FAMILIES["llama256"] = lambda: llama256(2)
    return run_gguf_recipe(tmp_path_factory.mktemp("gguf_run"), "llama256", [])


def check_file_against_run(path: Path, out: Path, model: Path, importance: bool) -> int:
    """Every linear's tensor in the GGUF file ``path`` has the type of its quantizer in the
    run's persisted plan (and in the export's persisted types), and dequantizes to that GGML
    type's fake_quant of the saved transformed weight with the saved importance, which a
    quantizer without importance ignores. Returns the number of linears checked."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    run = RunFolder.open(out / "blocks")
    (export,) = run.exports.values()
    (persisted,) = export["types"].values()
    mapper = TensorMapper(json.loads((model / "config.json").read_text()))
    checked = 0
    for block in run.iter_blocks():
        for name, lin in block.linears.items():
            gname = mapper.gguf_name(name + ".weight")
            t = tensors[gname]
            qtype = gguf.GGMLQuantizationType(t.tensor_type).name
            planned = run.plan.quantizers[name]
            assert (planned.name, persisted[gname]) == (qtype, qtype), gname
            assert planned.importance is importance, name
            assert lin.mean_sq is not None, name  # the run has statistics, used or not
            got = torch.from_numpy(
                np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            )
            quantizer = GgmlQuantizer(get_ggml_type(qtype), importance)
            expected = quantizer.fake_quant(lin.weight.float(), lin.mean_sq)
            expected = mapper.convert(name + ".weight", expected)  # q/k row permutation
            assert torch.equal(got.reshape(expected.shape), expected), gname
            checked += 1
    return checked


def test_plan_uses_the_mix_types(gguf_run):
    _, report, _ = gguf_run
    assert report["quantizer"].startswith("GGUF Q4_K_M")
    assert "Q4_K" in report["quantizer"] and "Q6_K" in report["quantizer"]


def test_gguf_tensors_are_what_the_pipeline_evaluated(gguf_run):
    """The file's dequantized weights equal the searched quantizer's output on the saved
    transformed weights with the saved importance: the export re-quantizes nothing else."""
    out, report, model = gguf_run
    path = next(iter(report["outputs"].values()))
    assert check_file_against_run(path, out, model, importance=True) == 14


def test_gguf_without_importance_writes_the_searched_types(tmp_path_factory):
    """``importance: false`` on the export of the searched mix: the search plans the types
    llama.cpp gives without an imatrix, which are the types the file has, and each tensor is
    the plain (importance-free) rounding of the saved weight. Q4_0 with an imatrix puts the
    first n_layer // 8 ffn_down in Q4_1, so the model has 8 layers; before the plan followed
    the export, those were searched as Q4_1 and written as Q4_0."""
    tiny_models.FAMILIES["llama256x8"] = lambda: llama256(8)
    out, report, model = run_gguf_recipe(
        tmp_path_factory.mktemp("gguf_plain"), "llama256x8",
        ["quant.gguf_mix=Q4_0", "export=[{kind: gguf, types: [Q4_0], importance: false}]",
         "evaluation.enabled=false"],
    )  # fmt: skip
    config = json.loads((model / "config.json").read_text())
    path = next(iter(report["outputs"].values()))
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape))
              for t in gguf.GGUFReader(path).tensors}  # fmt: skip
    linears = [n for n in shapes if n.startswith("blk.") and len(shapes[n]) == 2]
    with_imatrix = tensor_types("Q4_0", arch_info(config), shapes, True)
    plain = tensor_types("Q4_0", arch_info(config), shapes, False)
    # the test can fail: with and without an imatrix the mix differs on some linear
    assert [n for n in linears if with_imatrix[n] != plain[n]] == ["blk.0.ffn_down.weight"]
    assert report["quantizer"].startswith("GGUF Q4_0")
    assert check_file_against_run(path, out, model, importance=False) == 8 * 7


def test_llamacpp_runner_agrees_with_llama_perplexity(gguf_run, tmp_path):
    """Our llama.cpp evaluation path scores tokens exactly as llama-perplexity does, given
    llama-perplexity's own conventions: BOS in place of each chunk's first token (when the
    file adds BOS) and, to match our runner, an F32 KV cache."""
    import math

    from llamacpp_fixtures import llama_perplexity, require_llamacpp, tokenize

    from llmquant.evaluate.loaders import LlamaCppRunner
    from llmquant.evaluate.perplexity import token_nll

    tools = require_llamacpp()
    _, report, _ = gguf_run
    path = next(iter(report["outputs"].values()))
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n\n".join(tiny_models.make_documents(60, seed=5)))
    n_ctx, chunks = 64, 3
    expected = llama_perplexity(
        tools, "-m", path, "-f", text_file, "-c", n_ctx, "--chunks", chunks,
        "-t", 1, "-fa", "off", "-b", n_ctx, "-ctk", "f32", "-ctv", "f32",
    )  # fmt: skip
    fields = gguf.GGUFReader(path).fields
    ids = tokenize(path, text_file.read_text(), root=tools.root)
    windows = torch.tensor(ids[: n_ctx * chunks]).reshape(chunks, n_ctx)  # [chunks, n_ctx]
    if fields["tokenizer.ggml.add_bos_token"].contents():
        windows[:, 0] = fields["tokenizer.ggml.bos_token_id"].contents()
    runner = LlamaCppRunner(path, n_ctx=n_ctx, n_threads=1)
    nll = []
    try:
        for logits, row in zip(runner.window_logits(windows), windows.split(1)):
            # llama-perplexity scores the logits of positions n_ctx/2 .. n_ctx-2 (the tokens
            # after them); token_nll's column j is the NLL of token j + 1.
            nll.append(token_nll(logits, row)[:, n_ctx // 2 :])
    finally:
        runner.close()
    got = math.exp(torch.cat(nll).mean().item())
    assert got == pytest.approx(expected, rel=2e-4)
