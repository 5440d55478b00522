"""GGUF mixed precision to a target size: measured candidate errors, the allocated file, resume.

A tiny llama (rows of 256 and 512, so every candidate type fits) is quantized with
``quant.target_bpw`` and the export type ``target``; the file must hold exactly the allocated
types, be exactly the predicted size, meet the target, and run in llama.cpp.
"""

from __future__ import annotations

import json

import gguf
import llamacpp_fixtures
import numpy as np
import pytest
import tiny_models
import torch
from test_gguf_pipeline import llama256, run_gguf_recipe

from llmquant import pipeline
from llmquant.calib.block import _measure_candidates, candidate_errors
from llmquant.quant.ggml import get_ggml_type
from llmquant.quant.ggml.numerics import search_precision
from llmquant.quant.quantizers import GgmlQuantizer

llamacpp_tools = llamacpp_fixtures.llamacpp_tools
llamacpp_logits = llamacpp_fixtures.llamacpp_logits

# Few types keep the tiny runs short; their sizes (3.4375 to 8.5 bpw) give the allocator room,
# and Q3_K's ranges (16 weights) are finer than the searched Q4_K's clip groups (32).
CANDIDATES = "quant.candidates=[Q3_K, Q4_0, Q5_0, Q8_0]"
TARGET_EXPORT = "export=[{kind: gguf, types: [target]}]"


def _file_types(path) -> dict[str, str]:
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name
            for t in gguf.GGUFReader(path).tensors}  # fmt: skip


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    tiny_models.FAMILIES["llama256"] = lambda: llama256(2)
    tmp = tmp_path_factory.mktemp("target")
    out, report, model = run_gguf_recipe(
        tmp, "llama256", [CANDIDATES, "quant.target_bpw=5.5", TARGET_EXPORT]
    )
    return tmp, out, report, model


def test_candidate_errors_equal_a_naive_loop():
    """The block's output error with one linear quantized, summed over channels and averaged
    over tokens, for each candidate; the linear's weight is left as it was."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)
    x = torch.randn(3, 5, 64)  # [batch, seq, in]

    def run():
        return second(torch.relu(first(x)))

    reference = run()
    original = first.weight.data.clone()
    saved = original * 0.9  # a clipped weight: the writer quantizes this one
    importance = torch.rand(64)
    quantizers = [GgmlQuantizer(get_ggml_type(t)) for t in ("Q4_0", "Q8_0")]
    got = candidate_errors(first, saved, importance, quantizers, run, reference)
    assert torch.equal(first.weight.data, original)
    for q in quantizers:
        # candidates are compared under search precision (the fits a search makes)
        with search_precision():
            w_q = q.ggml_type.fake_quant(saved, importance)
        total = 0.0
        for b in range(3):
            for t in range(5):
                out = second(torch.relu(x[b, t] @ w_q.T + first.bias))
                total += float((out - reference[b, t]).detach().square().sum())
        assert got[q.name] == pytest.approx(total / 15, rel=1e-4), q.name
    assert got["Q8_0"] < got["Q4_0"]


class _ResidualBlock(torch.nn.Module):
    """x + a small MLP's output: a decoder block's shape (the residual dominates the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def test_candidate_errors_of_a_bfloat16_block_are_measured_in_float32():
    """A bfloat16 block's candidate errors equal its float32 copy's: in bfloat16 the rounding of
    a residual 100 x the block's contribution would swamp a Q8_0 error. The block stays as it
    was, in bfloat16."""
    torch.manual_seed(0)
    block32 = _ResidualBlock()
    block16 = _ResidualBlock().to(torch.bfloat16)
    block32.load_state_dict({k: v.float() for k, v in block16.state_dict().items()})
    before = {k: v.clone() for k, v in block16.state_dict().items()}
    x = 100 * torch.randn(2, 64, 64)  # [batch, seq, hidden]: a large residual stream
    types = [GgmlQuantizer(get_ggml_type(t)) for t in ("Q4_0", "Q8_0")]

    def measure(block: torch.nn.Module, inputs: torch.Tensor) -> dict:
        linears = {"up": block.up, "down": block.down}
        none = {name: None for name in linears}
        planned = {name: types[0] for name in linears}
        candidates = {name: types for name in linears}
        return _measure_candidates(block, linears, planned, candidates, none, {}, none, inputs,
                                   {}, 128, "")  # fmt: skip

    got = measure(block16, x.bfloat16())
    want = measure(block32, x.bfloat16().float())
    for name, errors in want.items():
        for t, error in errors.items():
            assert got[name][t] == pytest.approx(error, rel=1e-3), (name, t)
    assert want["down"]["Q8_0"] < want["down"]["Q4_0"] / 10
    after = block16.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v)
               for k, v in before.items())  # fmt: skip


@torch.no_grad()
def test_candidate_errors_are_relative_to_each_token_of_the_block_output():
    """Each error is the mean over tokens of the token's squared error over its squared output
    norm (what the next block's RMSNorm sees), checked against a loop over tokens; a block whose
    stream is 10 x larger (the same weights: a bias-free residual block is homogeneous) gets the
    same errors, where absolute ones would be 100 x; a token with a 100 x larger output (a
    massive activation) counts as much as any other, not 10,000 x."""
    torch.manual_seed(0)
    block = _ResidualBlock()
    for lin in (block.up, block.down):
        lin.bias = None
    x = torch.randn(2, 16, 64)  # [batch, seq, hidden]
    x[0, 0] *= 100  # one token with a massive activation
    types = [GgmlQuantizer(get_ggml_type(t)) for t in ("Q4_0", "Q8_0")]
    linears = {"up": block.up, "down": block.down}
    none = {name: None for name in linears}

    def measure(inputs: torch.Tensor) -> dict:
        return _measure_candidates(
            block, linears, {n: types[0] for n in linears}, {n: types for n in linears}, none,
            {}, none, inputs, {}, 32, "",
        )  # fmt: skip

    small, large = measure(x), measure(10 * x)
    reference = block(x)
    for name, module in linears.items():
        original = module.weight.data.clone()
        for q in types:
            with search_precision():
                module.weight.data = q.fake_quant(original, None)
            out = block(x)
            module.weight.data = original
            ratios = [float((out[b, t] - reference[b, t]).square().sum()
                            / reference[b, t].square().sum())
                      for b in range(2) for t in range(16)]  # fmt: skip
            want = sum(ratios) / len(ratios)
            assert small[name][q.name] == pytest.approx(want, rel=1e-4), (name, q.name)
            assert large[name][q.name] == pytest.approx(small[name][q.name], rel=1e-3)
        assert small[name]["Q8_0"] < small[name]["Q4_0"]


def test_target_file_has_the_allocated_types_and_the_predicted_size(target_run):
    _, out, report, _ = target_run
    allocation = report["allocation"]["gguf"]
    path = report["outputs"]["gguf-target"]
    types = _file_types(path)
    for tensor, ggml_type in allocation["types"].items():
        assert types[tensor] == ggml_type, tensor
    assert allocation["file_bytes"] == allocation["predicted_bytes"]
    assert allocation["linears_bytes"] <= allocation["budget_linears_bytes"]
    assert 5.0 < allocation["linears_bpw"] <= 5.5
    # a mix, not one type: the target lies between the candidates' sizes
    assert len(allocation["counts"]) >= 2, allocation["counts"]
    # the choice is persisted where the writer read it
    manifest = json.loads((out / "blocks" / "manifest.json").read_text())
    persisted = manifest["exports"]["gguf"]["types"]["target"]
    assert {t: persisted[t] for t in allocation["types"]} == allocation["types"]
    markdown = (out / "report.md").read_text()
    assert "Mixed precision (gguf, quant.target_bpw 5.5)" in markdown
    # each layer's row shows the gain its errors were weighted by
    gain = report["blocks"][1]["downstream_gain"]
    assert f"| 1 | {gain:.3g} | " in markdown


def test_allocation_spends_bits_where_errors_fall_most(target_run):
    """Each linear's error falls with more bits; the allocation is the one of least summed
    error among those within the budget that differ from it in one linear."""
    _, out, report, _ = target_run
    allocation = report["allocation"]["gguf"]
    errors: dict[str, dict[str, float]] = {}
    for block in report["blocks"]:
        # each block's errors in what they cost at the model's output (calib.downstream)
        gain = block["downstream_gain"]
        assert 0 < gain < float("inf"), block["block"]
        errors.update({m: {t: e * gain for t, e in by_type.items()}
                       for m, by_type in block["candidate_errors"].items()})  # fmt: skip
    for module, by_type in errors.items():
        assert by_type["Q8_0"] < by_type["Q5_0"] < by_type["Q4_0"], module
    assert allocation["total_error"] == pytest.approx(
        sum(errors[m][t] for m, t in _modules(allocation, errors).items())
    )


def _modules(allocation: dict, errors: dict) -> dict[str, str]:
    """Module path -> allocated type (GGUF names back to module paths by layer and kind)."""
    kinds = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    by_module = {}
    for tensor, ggml_type in allocation["types"].items():
        _, layer, kind, _ = tensor.split(".")
        by_module[f"model.layers.{layer}.{kinds[kind]}"] = ggml_type
    assert set(by_module) == set(errors)
    return by_module


def _target_recipe(tmp, model, target: str):
    """The recipe ``target_run`` was made with (run_gguf_recipe's settings), at ``target``."""
    from llmquant.recipe import load_recipe

    return load_recipe("recipes/llama_w4_gguf.yaml", [
        f"model.source={model}", f"data.source={tmp / 't.jsonl'}", "calibration.n_samples=4",
        "calibration.seq_len=32", "evaluation.n_windows=3", "evaluation.seq_len=32",
        "awq.n_grid=4", "awq.clip_n_grid=4", CANDIDATES, target, TARGET_EXPORT,
    ])  # fmt: skip


def test_resume_with_another_target_reallocates_without_block_work(target_run, monkeypatch):
    tmp, out, report, model = target_run
    first = report["allocation"]["gguf"]

    def no_block_work(*args, **kwargs):
        raise AssertionError("a saved block was quantized again")

    monkeypatch.setattr(pipeline, "quantize_block", no_block_work)
    recipe = _target_recipe(tmp, model, "quant.target_bpw=7")
    resumed = pipeline.run(recipe, out, resume=True)
    second = resumed["allocation"]["gguf"]
    # the downstream gains are carried along the loaded blocks again: the same as the first's
    assert [b["downstream_gain"] for b in resumed["blocks"]] == pytest.approx(
        [b["downstream_gain"] for b in report["blocks"]], rel=1e-6
    )
    assert 5.5 < second["linears_bpw"] <= 7
    assert second["total_error"] < first["total_error"]
    assert second["file_bytes"] == second["predicted_bytes"] > first["file_bytes"]


@pytest.mark.llamacpp
def test_llamacpp_runs_the_mixed_file_like_torch(target_run, llamacpp_logits):
    from test_gguf_llamacpp import dequantized_model, hf_logits, random_ids

    _, _, report, model_dir = target_run
    path = report["outputs"]["gguf-target"]
    model = dequantized_model(model_dir, path)
    ids = random_ids(model.config.vocab_size)
    ref = hf_logits(model, ids)
    got = llamacpp_logits(path, ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    # as test_gguf_llamacpp's TOLERANCE for Q8_0/Q4_0 files (llama.cpp quantizes activations)
    assert rel < 0.15 and corr > 0.998, (rel, corr)


def test_resume_refuses_a_folder_whose_errors_are_another_measure(target_run, monkeypatch):
    """A size target's saved candidate errors are of one measure; a folder made when the
    blocks measured another is refused by --resume (exit 2, naming what changed) rather than
    allocated from two measures at once."""
    tmp, out, _, model = target_run
    from llmquant import preflight
    from llmquant.errors import InputError

    monkeypatch.setattr(preflight, "CANDIDATE_ERROR_MEASURE", "another measure")
    recipe = _target_recipe(tmp, model, "quant.target_bpw=5.5")
    with pytest.raises(InputError, match=r"--resume with a different recipe.*\(quant changed\)"):
        pipeline.run(recipe, out, resume=True)
