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


def _naive_scale_search(lin, x, quantizer, n_grid):
    """The scale search written out: every α, every channel's scale, loss by a plain loop."""
    w = lin.weight.data.clone()
    reference = x @ w.T
    x_mean = x.abs().reshape(-1, x.shape[-1]).mean(dim=0)
    group = quantizer.clip_group_size
    w_abs = w.abs()
    w_norm = torch.empty_like(w)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            block = w_abs[row, start : start + group]
            w_norm[row, start : start + group] = block / (block.max() + 1e-6)
    w_mean = w_norm.mean(dim=0)
    losses = {}
    for step in range(n_grid):
        alpha = step / n_grid
        s = torch.tensor(
            [
                max(max(float(m), 1e-8) ** alpha / (float(v) ** (1 - alpha) + 1e-4), 1e-4)
                for m, v in zip(x_mean, w_mean)
            ]
        )
        s = s / (s.max() * s.min()).sqrt()
        w_q = quantizer.fake_quant(w * s) / s
        losses[alpha] = ((x @ w_q.T) - reference).square().mean().item()
    plain = ((x @ quantizer.fake_quant(w).T) - reference).square().mean().item()
    return plain, losses


@pytest.mark.parametrize(
    "inspect,batches,loss_from",
    [
        ("the linear", 4, "Gram matrix"),  # 96 tokens > 64 input features
        ("the linear", 2, "outputs"),  # 48 tokens: outputs are the cheaper loss
        ("a module", 4, "outputs"),
    ],
)
def test_scale_search_picks_the_alpha_a_naive_loop_picks(inspect, batches, loss_from):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True)
    x = torch.randn(batches, 24, 64)
    x[..., :3] *= 30.0  # outlier channels: AWQ's premise, so some α must beat plain rounding
    quantizer = IntQuantizer(IntGrid(3, 16, False))
    plain, losses = _naive_scale_search(lin, x, quantizer, n_grid=10)
    x_mean = x.abs().mean(dim=(0, 1))
    run_inspect = lin if inspect == "the linear" else (lambda t: lin(t))
    forwards = []
    hook = lin.register_forward_hook(lambda *_: forwards.append(1))
    result = awq.search_scales([lin], [x], run_inspect, x_mean, [quantizer], n_grid=10)
    hook.remove()
    assert (len(forwards) == 0) == (loss_from == "Gram matrix")
    best_alpha = min(losses, key=losses.get)
    assert losses[best_alpha] < plain * 0.9, "the outliers should make scaling pay"
    assert result.alpha == best_alpha
    assert result.loss_rtn == pytest.approx(plain, rel=1e-4)
    assert result.loss_best == pytest.approx(losses[best_alpha], rel=1e-4)


class _CountingQuantizer(IntQuantizer):
    """An int grid that counts the candidates a search quantizes."""

    calls = 0

    def fake_quant(self, w, importance=None, clip=None):
        self.calls += 1
        return super().fake_quant(w, importance, clip)


def test_refined_grid_order_reaches_every_alpha():
    for n_grid in (1, 3, 8, 10, 20, 40):
        rounds = awq.refined_grid_order(n_grid)
        reachable = set(rounds[0])
        for offsets in rounds[1:]:
            reachable |= {k + o for k in reachable for o in offsets}
        assert set(range(n_grid)) <= reachable, n_grid


@pytest.mark.parametrize("n_grid,refined_calls", [(10, 8), (20, 10)])
def test_refined_search_finds_the_full_grids_alpha_in_fewer_candidates(n_grid, refined_calls):
    # Outliers of several strengths give loss curves whose minimum moves across the grid; on
    # each (unimodal, as measured on real models) refine must land on the full grid's α.
    for seed, strength in enumerate((3.0, 10.0, 30.0, 100.0)):
        torch.manual_seed(seed)
        lin = nn.Linear(64, 32, bias=False)
        x = torch.randn(2, 48, 64)
        x[..., :4] *= strength
        x_mean = x.abs().mean(dim=(0, 1))
        found = {}
        for refine in (False, True):
            quantizer = _CountingQuantizer(IntGrid(3, 16, False))
            found[refine] = awq.search_scales(
                [lin], [x], lin, x_mean, [quantizer], n_grid=n_grid, refine=refine
            )
            found[refine, "calls"] = quantizer.calls
        assert found[True].alpha == found[False].alpha, (seed, strength)
        assert found[True].loss_best == found[False].loss_best
        assert found[False, "calls"] == n_grid + 1
        assert found[True, "calls"] <= refined_calls  # plain rounding + the α evaluated


def _naive_clip(w, x, quantizer, ratios):
    """Per (output row, group): the shrink ratio whose group output error is lowest."""
    group = quantizer.clip_group_size
    n_groups = w.shape[1] // group
    best = torch.ones(w.shape[0], n_groups)
    for row in range(w.shape[0]):
        best_err = [float("inf")] * n_groups
        for ratio in ratios:
            q = quantizer.fake_quant(w[row : row + 1], None, torch.full((1, n_groups), ratio))[0]
            for g in range(n_groups):
                cols = slice(g * group, (g + 1) * group)
                err = (x[:, cols] @ (q[cols] - w[row, cols])).square().mean().item()
                if err < best_err[g]:
                    best_err[g], best[row, g] = err, ratio
    return best


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True), (2, False)])
def test_clip_search_chooses_the_ratios_a_naive_loop_chooses(bits, symmetric):
    torch.manual_seed(0)
    # Heavy-tailed weights, as in real LLMs: some groups gain from a shrunk range.
    w = torch.distributions.StudentT(2.0).sample((12, 64))
    x = torch.randn(300, 64)
    quantizer = IntQuantizer(IntGrid(bits, 16, symmetric))
    ratios, before, after = clip.search_clip(w, x, quantizer, n_grid=10, out_batch=5)
    expected = _naive_clip(w, x, quantizer, clip.shrink_ratios(10, 0.5))
    assert ratios is not None, "clipping the outlier groups should lower the loss"
    assert torch.equal(ratios, expected)
    assert before == pytest.approx(clip.layer_loss(quantizer.fake_quant(w), w, x))
    assert after == pytest.approx(clip.layer_loss(quantizer.fake_quant(w, None, ratios), w, x))
    assert after < before


def test_shrink_ratios_grid():
    assert clip.shrink_ratios(20, 0.5) == [1.0 - k / 20 for k in range(10)]


@pytest.mark.parametrize("type_name", ["Q5_0", "Q4_1", "Q4_K", "Q6_K", "IQ4_NL"])
def test_search_precision_changes_no_bytes_outside_and_fits_almost_as_well_inside(type_name):
    from llmquant.quant.ggml import get_ggml_type
    from llmquant.quant.ggml.numerics import search_precision

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02
    importance = torch.rand(512)
    ggml_type = get_ggml_type(type_name)
    exact = ggml_type.quantize(w, importance)
    exact_w = ggml_type.fake_quant(w, importance)
    with search_precision():
        searched_w = ggml_type.fake_quant(w, importance)
    # The context is left: bytes are llama.cpp's again (test_ggml_llamacpp checks those).
    assert (ggml_type.quantize(w, importance) == exact).all()
    # Inside, every third trial scale: some blocks fit another scale, the error barely moves.
    exact_err = ((exact_w - w).square() * importance).sum().item()
    searched_err = ((searched_w - w).square() * importance).sum().item()
    assert exact_err <= searched_err * 1.002  # the full trial set is (nearly) never worse
    assert searched_err < exact_err * 1.03


def test_search_trials_keep_both_ends_of_the_grid():
    from llmquant.quant.ggml.numerics import search_precision, trials

    assert trials(range(-9, 10)) == list(range(-9, 10))
    with search_precision():
        assert trials(range(-9, 10)) == [-9, -6, -3, 0, 3, 6, 9]
        assert trials(range(21)) == [0, 3, 6, 9, 12, 15, 18, 20]
        assert trials(range(37)) == list(range(0, 37, 3))


def test_statistics_equal_a_naive_pass_over_every_linears_inputs(tmp_path):
    """mean |x| and mean x² of each linear's inputs, with the reduction shared by linears fed
    the same tensor (q, k, v; gate, up), against inputs recorded one linear at a time."""
    from llmquant.calib.stats import StatsCollector

    streamed, block, _, inputs = _setup(tmp_path, "llama")
    recorded: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: recorded.setdefault(name, []).append(args[0].clone())
        )
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]
    collector = StatsCollector(block)
    run_block(block, inputs.batches, inputs.kwargs[0])
    collector.remove()
    for handle in handles:
        handle.remove()
    assert set(collector.stats) == set(recorded) and len(recorded) == 7
    for name, xs in recorded.items():
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()  # [tokens, in]
        stats = collector.stats[name]
        assert stats.n_tokens == flat.shape[0], name
        assert torch.allclose(stats.mean_abs.double(), flat.abs().mean(0), rtol=1e-6), name
        assert torch.allclose(stats.mean_sq.double(), flat.square().mean(0), rtol=1e-6), name


def test_propagated_outputs_are_the_quantized_blocks_and_give_the_same_block_loss(tmp_path):
    """With ``propagate`` the block returns the quantized block's outputs for every batch (the
    next block's inputs) and takes the block loss from their search batches: the loss its own
    pass over the search batches gives without ``propagate``, bit for bit."""
    got = {}
    for propagate in (False, True):
        _, block, spec, inputs = _outlier_block(tmp_path / str(propagate))
        quantizer = IntQuantizer(IntGrid(4, 16, False))
        planned = {
            "model.layers.0." + name: quantizer
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear)
        }
        result, outputs = quantize_block(
            0, block, "model.layers.0.", spec, planned, inputs.batches, inputs.kwargs[0],
            Awq(n_grid=4, clip_n_grid=4), search_batches=1, propagate=propagate,
        )  # fmt: skip
        quantized = run_block(block, inputs.batches, inputs.kwargs[0])
        got[propagate] = result.info["block_loss"], outputs, quantized
    assert len(inputs.batches) == 2  # one search batch, one more
    (loss_fp, outputs_fp, quantized_fp), (loss_q, outputs_q, quantized_q) = got[False], got[True]
    assert loss_q == loss_fp
    assert all(torch.equal(a, b) for a, b in zip(outputs_q, quantized_q, strict=True))
    # without propagate the outputs are the full-precision block's, not the quantized one's
    assert not any(torch.equal(a, b) for a, b in zip(outputs_fp, quantized_fp, strict=True))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kept_inspect_outputs_equal_the_search_inspecting_its_inputs(tmp_path, family):
    """The scale search's references come from the statistics pass: for every group, the
    inspected module's outputs kept there equal, bit for bit, that module run by the search
    on the inputs kept for the group."""
    from llmquant.calib.block import _inspect_fn
    from llmquant.calib.stats import StatsCollector

    _, block, spec, inputs = _setup(tmp_path, family)
    groups = [g for g in usable_groups(spec, block) if g.inspect not in g.linears]
    assert groups, f"{family}: no group inspects a module other than its linears"
    collector = StatsCollector(
        block,
        keep_inputs_of={g.linears[0] for g in groups},
        keep_batches=1,
        keep_outputs_of={g.inspect for g in groups},
    )
    try:
        run_block(block, inputs.batches, inputs.kwargs[0])
    finally:
        collector.remove()
    for group in groups:
        (kept_input,) = collector.kept[group.linears[0]]
        (kept_output,) = collector.kept_outputs[group.inspect]
        searched = _inspect_fn(block, group.inspect, inputs.kwargs[0])(kept_input)
        assert torch.equal(kept_output, searched), (family, group.inspect)
