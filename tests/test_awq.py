"""Scale folding, scale search and clip search on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, make_model
from torch import nn

from llmquant.calib.block import quantize_block
from llmquant.calib.capture import capture_inputs, run_block
from llmquant.model.arch import resolve_arch, usable_groups
from llmquant.model.stream import StreamedModel
from llmquant.quant import awq, clip
from llmquant.quant.grid import IntGrid
from llmquant.quant.quantizers import IntQuantizer
from llmquant.recipe import Awq


def _setup(tmp_path, family, seed=0):
    streamed = StreamedModel(make_model(tmp_path / family, family, seed=seed))
    block = streamed.load_block(0)
    spec = resolve_arch(streamed.config.architectures, block)
    torch.manual_seed(seed)
    windows = torch.randint(2, streamed.config.vocab_size, (4, 24))
    inputs = capture_inputs(streamed, windows, batch_size=2)
    return streamed, block, spec, inputs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folding_scales_leaves_full_precision_output_unchanged(tmp_path, family):
    streamed, block, spec, inputs = _setup(tmp_path, family)
    before = run_block(block, inputs.batches, inputs.kwargs[0])
    groups = usable_groups(spec, block)
    assert groups, f"{family}: no usable scale group"
    for group in groups:
        members = [block.get_submodule(n) for n in group.linears]
        scales = torch.rand(members[0].in_features) * 4 + 0.25
        awq.fold_scales(
            block.get_submodule(group.prev),
            members,
            scales,
            norm_plus_one=spec.norm_plus_one,
            prev_rows=group.prev_rows,
        )
    after = run_block(block, inputs.batches, inputs.kwargs[0])
    for a, b in zip(before, after):
        assert (a - b).norm() / b.norm() < 1e-5


def test_gqa_skips_v_to_o_but_mha_keeps_it(tmp_path):
    _, block, spec, _ = _setup(tmp_path, "llama")
    assert "self_attn.v_proj" not in {g.prev for g in usable_groups(spec, block)}
    _, block, spec, _ = _setup(tmp_path, "llama_mha")
    assert "self_attn.v_proj" in {g.prev for g in usable_groups(spec, block)}


def _outlier_block(tmp_path, family="llama_mha"):
    streamed, block, spec, inputs = _setup(tmp_path, family, seed=3)
    with torch.no_grad():
        # A few input channels with large activations, as in real LLMs: AWQ's premise.
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weight = block.get_submodule(norm).weight
            weight[:4] *= 25.0
    return streamed, block, spec, inputs


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_with_outlier_channels(tmp_path, bits):
    losses = {}
    for use_awq in (False, True):
        streamed, block, spec, inputs = _outlier_block(tmp_path / str(use_awq))
        quantizer = IntQuantizer(IntGrid(bits, 16, False))
        planned = {
            "model.layers.0." + name: quantizer
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear)
        }
        settings = Awq(enabled=use_awq, clip=use_awq, n_grid=10, clip_n_grid=10)
        result, _ = quantize_block(
            0,
            block,
            "model.layers.0.",
            spec,
            planned,
            inputs.batches,
            inputs.kwargs[0],
            settings,
            search_batches=2,
        )
        losses[use_awq] = result.info["block_loss"]
        if use_awq:
            assert result.info["block_loss_rtn"] == pytest.approx(losses[False], rel=1e-6)
    assert losses[True] < losses[False]


def test_scale_search_never_worse_than_rtn(tmp_path):
    _, block, spec, inputs = _setup(tmp_path, "llama")
    lin = block.get_submodule("mlp.down_proj")
    x = [torch.randn(2, 24, lin.in_features)]
    result = awq.search_scales(
        [lin], x, lin, x[0].abs().mean(dim=(0, 1)), [IntQuantizer(IntGrid(3, 16, False))], n_grid=5
    )
    assert result.loss_best <= result.loss_rtn


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True), (2, False)])
def test_clip_search_never_increases_layer_loss(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(48, 64) * torch.linspace(0.2, 3.0, 64)
    w[:, 5] *= 8
    x = torch.randn(300, 64)
    quantizer = IntQuantizer(IntGrid(bits, 16, symmetric))
    ratios, before, after = clip.search_clip(w, x, quantizer, n_grid=10, out_batch=16)
    plain = clip.layer_loss(quantizer.fake_quant(w), w, x)
    assert before == pytest.approx(plain)
    assert after <= before
    if ratios is not None:
        assert clip.layer_loss(quantizer.fake_quant(w, None, ratios), w, x) == pytest.approx(after)


def test_shrink_ratios_grid():
    assert clip.shrink_ratios(20, 0.5) == [1.0 - k / 20 for k in range(10)]
