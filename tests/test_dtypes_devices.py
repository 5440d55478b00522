"""bfloat16 checkpoints, compute dtypes, devices and the memory model, on tiny models (CPU)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from export_fixtures import assert_close_rel, logits
from tiny_models import make_model, make_text_file
from transformers import AutoModelForCausalLM

from llmquant import pipeline
from llmquant.formats import open_output
from llmquant.model.device import predicted_peak_rss
from llmquant.model.stream import StreamedModel
from llmquant.recipe import load_recipe
from llmquant.run import main
from llmquant.tensors import SafetensorsFolder, load_all

ALL_EXPORTS = "export=[{kind: awq-gemm}, {kind: compressed-tensors}, {kind: gguf, types: [Q8_0]}]"


def _bf16_copy(source, target):
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(target)
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special")):
            shutil.copy(path, target / path.name)
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dtypes")
    fp32 = make_model(tmp / "fp32", "llama")
    return tmp, fp32, _bf16_copy(fp32, tmp / "bf16"), make_text_file(tmp / "docs.jsonl")


def _recipe(model, text, *extra):
    return load_recipe(
        None,
        [
            f"model.source={model}", f"data.source={text}", "calibration.n_samples=4",
            "calibration.seq_len=32", "evaluation.n_windows=3", "evaluation.seq_len=32",
            "evaluation.batch_size=2", "quant.group_size=16", "awq.n_grid=4", "awq.clip_n_grid=4",
            *extra,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def bf16_run(models):
    tmp, _, bf16, text = models
    return pipeline.run(_recipe(bf16, text, ALL_EXPORTS), tmp / "out_bf16")


def test_bf16_checkpoint_writes_all_three_exports(bf16_run, models):
    _, _, bf16, _ = models
    outputs = bf16_run["outputs"]
    assert set(outputs) == {"awq-gemm", "compressed-tensors", "gguf-Q8_0"}
    assert bf16_run["runtime"]["dtype"] == "bfloat16"
    assert bf16_run["runtime"]["compute_dtype"] == "float32"
    ct = SafetensorsFolder(outputs["compressed-tensors"])
    awq = SafetensorsFolder(outputs["awq-gemm"])
    assert ct.dtype("model.layers.0.mlp.down_proj.weight_scale") == "BF16"
    assert ct.dtype("model.layers.0.input_layernorm.weight") == "BF16"
    assert awq.dtype("model.layers.0.mlp.down_proj.scales") == "F16"
    # The same scales in both files: bfloat16 values float16 holds exactly.
    ct_scale = ct.get("model.layers.0.mlp.down_proj.weight_scale").float()
    awq_scale = awq.get("model.layers.0.mlp.down_proj.scales").float().T
    assert torch.equal(ct_scale, awq_scale)
    for name in ("compressed-tensors", "awq-gemm"):
        config = json.loads((bf16 / "config.json").read_text())
        written = json.loads((Path(outputs[name]) / "config.json").read_text())
        assert written.get("torch_dtype", written.get("dtype")) == config.get(
            "torch_dtype", config.get("dtype")
        )
    reader = gguf.GGUFReader(outputs["gguf-Q8_0"])
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert "Q8_0" in types


def test_bf16_compressed_tensors_loads_in_transformers_with_our_readers_logits(bf16_run, models):
    _, _, bf16, _ = models
    folder = bf16_run["outputs"]["compressed-tensors"]
    state = load_all(open_output(folder)[0])
    reference = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    reference.load_state_dict(state, strict=False)
    expected = logits(reference)  # our reader's dequantized weights, computed in float32
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert_close_rel(logits(loaded), expected, 1e-5)
    in_bf16 = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert in_bf16.dtype == torch.bfloat16


def test_fp32_and_bf16_sources_give_close_perplexities(bf16_run, models):
    tmp, fp32, _, text = models
    fp32_run = pipeline.run(_recipe(fp32, text), tmp / "out_fp32")
    for key in ("baseline", "quantized"):
        ratio = bf16_run["ppl"][key] / fp32_run["ppl"][key]
        assert abs(ratio - 1) < 0.01, (key, bf16_run["ppl"], fp32_run["ppl"])


def test_bf16_compute_dtype_runs_the_search(models):
    """The search used to fail with "expected m1 and m2 to have the same dtype" in bfloat16."""
    tmp, _, bf16, text = models
    report = pipeline.run(
        _recipe(bf16, text, "runtime.compute_dtype=bfloat16"), tmp / "out_bf16_compute"
    )
    assert report["runtime"]["compute_dtype"] == "bfloat16"
    assert all(b["groups"] for b in report["blocks"])
    base = report["ppl"]["baseline"]
    assert abs(report["ppl"]["quantized"] / base - 1) < 0.05


def _predicted(tmp_path, name, **config):
    from tiny_models import FAMILIES

    def family():
        base = FAMILIES["llama"]()
        for key, value in config.items():
            setattr(base, key, value)
        return base

    FAMILIES[name] = family
    try:
        folder = make_model(tmp_path / name, name)
    finally:
        del FAMILIES[name]
    streamed = StreamedModel(folder)
    return predicted_peak_rss(streamed, torch.float32, 0, pipeline.writer_buffer_bytes(
        streamed, torch.float32, []))  # fmt: skip


def test_predicted_peak_grows_with_block_size_not_block_count(tmp_path):
    two = _predicted(tmp_path, "two", num_hidden_layers=2)
    six = _predicted(tmp_path, "six", num_hidden_layers=6)
    wide = _predicted(tmp_path, "wide", num_hidden_layers=2, intermediate_size=512)
    assert six == two
    block = 3 * 64 * (512 - 128) * 4 * 3  # three MLP matrices, (2 x load + compute) x 4 bytes
    assert wide - two == block


@pytest.mark.parametrize(
    "override, named",
    [
        ("runtime.device=cuda", "runtime.device"),
        ("runtime.device=cuda:3", "runtime.device"),
        ("runtime.device=tpu", "runtime.device"),
        ("runtime.max_device_gb=0.000001", "runtime.max_device_gb"),
        ("runtime.compute_dtype=float64", "runtime.compute_dtype"),
        ("model.dtype=int8", "model.dtype"),
    ],
)
def test_bad_runtime_exit_2_before_any_work(models, tmp_path, capsys, override, named):
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda is not bad input here")
    _, fp32, _, text = models
    out = tmp_path / "out"
    code = main(
        ["recipes/llama_w4.yaml", "--out", str(out), "--set", f"model.source={fp32}",
         "--set", f"data.source={text}", "--set", override]
    )  # fmt: skip
    assert code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_float16_that_cannot_hold_the_weights_exit_2_naming_the_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = make_model(tmp_path / "m", "llama")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6  # beyond float16's 65504
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    text = make_text_file(tmp_path / "docs.jsonl")
    out = tmp_path / "out"
    code = main(
        ["recipes/llama_w4.yaml", "--out", str(out), "--set", f"model.source={folder}",
         "--set", f"data.source={text}", "--set", "model.dtype=float16",
         "--set", "calibration.n_samples=2", "--set", "calibration.seq_len=16",
         "--set", "evaluation.enabled=false", "--set", "awq.enabled=false"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.down_proj.weight" in err and "float16" in err
    assert not any(out.rglob("*.safetensors"))


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_eval_on_a_device_that_does_not_exist_exit_2(models, tmp_path, capsys, device):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda is not bad input here")
    from llmquant import eval as eval_cli

    _, fp32, _, text = models
    out = tmp_path / "results"
    code = eval_cli.main(
        ["--baseline", str(fp32), "--text", str(text), "--device", device, "--out", str(out)]
    )
    assert code == 2
    assert "device" in capsys.readouterr().err
    assert not out.exists()


def test_loaded_block_results_do_not_keep_the_file_mapped(tmp_path):
    """A block result read back owns its memory: overwriting the file in place afterwards does
    not change it (a zero-copy tensor would, and would keep the mapped file resident: the 7B
    export's RSS grew with every block that way)."""
    from llmquant.quant.grid import IntGrid, quantize
    from llmquant.quant.results import BlockResult, LinearResult
    from llmquant.runfolder.blocks import load_block, save_block

    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    codes = quantize(w.float(), IntGrid(4, 32, False))
    name = "model.layers.0.mlp.down_proj"
    tensors = {name + ".weight": w, "model.layers.0.input_layernorm.weight": torch.ones(64)}
    result = BlockResult(0, tensors, {name: LinearResult(name, w, codes, mean_sq=torch.ones(64))})
    path = tmp_path / "block_00000.safetensors"
    save_block(path, result)
    loaded = load_block(path)
    before = {k: v.clone() for k, v in loaded.tensors.items()}
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(b"\x00" * (size - size // 2))
    for key, value in before.items():
        assert torch.equal(loaded.tensors[key], value), key
    assert torch.equal(loaded.linears[name].codes.codes, codes.codes)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_compute_on_a_cpu_warns_only_without_native_bf16(monkeypatch, caplog, native):
    from llmquant.model import device as device_mod

    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="llmquant.model.device"):
        dtype = device_mod.resolve_compute_dtype("bfloat16", torch.device("cpu"))
        assert device_mod.resolve_compute_dtype("float32", torch.device("cpu")) == torch.float32
    assert dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records]
    assert bool(warned) is not native, warned
    if warned:
        assert "runtime.compute_dtype=float32" in warned[0] and "AVX512-BF16" in warned[0]


def test_the_gguf_recipe_computes_in_bfloat16():
    recipe = load_recipe("recipes/llama_w4_gguf.yaml")
    assert recipe.runtime.compute_dtype == "bfloat16"
