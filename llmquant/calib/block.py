"""Quantize one loaded decoder block: statistics, scale search, clip search, grid codes.

Module plumbing around the pure searches of ``llmquant.quant.awq`` and ``llmquant.quant.clip``:
it runs the block with hooks, calls the searches, folds their results into the block and
replaces every planned linear's weight by its quantized value (so running the block afterwards
gives the quantized model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llmquant.calib.capture import run_block, sanitize_kwargs
from llmquant.calib.stats import StatsCollector
from llmquant.model.arch import ArchSpec, usable_groups
from llmquant.model.device import to_device
from llmquant.quant import awq, clip
from llmquant.quant.ggml.numerics import search_precision
from llmquant.quant.grid import clamp_to_clip
from llmquant.quant.quantizers import Quantizer
from llmquant.quant.results import BlockResult, LinearResult
from llmquant.recipe import Awq
from llmquant.values import check_result


def planned_linears(block: nn.Module, prefix: str, planned) -> dict[str, nn.Linear]:
    """The block's linears that ``planned`` (a set or plan of full module paths) quantizes,
    by path relative to the block, in module order."""
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and prefix + name in planned
    }


def _inspect_fn(block: nn.Module, path: str, kwargs: dict):
    module = block.get_submodule(path)
    if isinstance(module, nn.Linear):
        return module
    module_kwargs = sanitize_kwargs(module, kwargs)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = module(x, **module_kwargs) if module_kwargs else module(x)
        return out[0] if isinstance(out, tuple) else out

    return run


def _subsample_tokens(batches: list[torch.Tensor], n_tokens: int) -> torch.Tensor:
    flat = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches], dim=0)  # [tokens, in]
    if flat.shape[0] <= n_tokens:
        return flat
    step = flat.shape[0] // n_tokens
    return flat[::step][:n_tokens]


@torch.no_grad()
def quantize_block(
    index: int,
    block: nn.Module,
    prefix: str,
    spec: ArchSpec,
    planned: dict[str, Quantizer],
    inputs: list[torch.Tensor],
    kwargs: dict,
    settings: Awq,
    search_batches: int,
    storage_dtype: torch.dtype | None = None,
    candidates: dict[str, list[Quantizer]] | None = None,
    propagate: bool = False,
) -> tuple[BlockResult, list[torch.Tensor]]:
    """Quantize ``block`` in place; return its result and its outputs for every batch of
    ``inputs``: full precision, or with ``propagate`` the quantized block's (whose first search
    batches then give the block loss, so it needs no pass of its own).

    ``planned`` maps full module paths to their quantizers (the run's plan); the searches run on
    the first ``search_batches`` batches of ``inputs``; with no ``inputs`` (nothing reads
    statistics) the block is only rounded, and its losses are None. ``storage_dtype``
    (default: the block's own) is what the block file keeps the transformed tensors in.
    ``candidates`` (full module path -> quantizers) adds the block's output error with each
    linear alone under each of its candidates (on about ``awq.clip_n_tokens`` tokens of the
    first search batch) to ``info["candidate_errors"]``.
    """
    started = time.perf_counter()
    parts = PartTimer()
    linears = planned_linears(block, prefix, planned)
    quantizers = {name: planned[prefix + name] for name in linears}
    groups = usable_groups(spec, block) if settings.enabled else []
    clip_enabled = settings.enabled and settings.clip
    candidates = {name: candidates[prefix + name] for name in linears
                  if candidates and prefix + name in candidates}  # fmt: skip
    kept = {g.linears[0] for g in groups}
    if clip_enabled:
        kept |= set(linears)
    searched = bool(groups) or clip_enabled
    stats: dict = {}
    fp_outputs: list[torch.Tensor] = []
    if inputs:
        # The inspected modules' outputs on the search batches are the scale search's
        # references: kept from this pass instead of recomputed per group.
        inspected = {g.inspect for g in groups if g.inspect not in g.linears}
        collector = StatsCollector(
            block, keep_inputs_of=kept, keep_batches=search_batches, keep_outputs_of=inspected
        )
        try:
            fp_outputs = run_block(block, inputs, kwargs)
        finally:
            collector.remove()
        stats = collector.stats
    parts.lap("statistics pass")
    search_inputs = inputs[:search_batches]
    fp_search_outputs = fp_outputs[:search_batches]
    # Without a search, the loss of plain rounding is the block loss below: one pass less.
    rtn_loss = (
        _rtn_block_loss(block, linears, quantizers, search_inputs, fp_search_outputs, kwargs)
        if searched
        else None
    )
    parts.lap("rtn loss pass")
    input_scale = {name: None for name in linears}  # linears whose inputs were divided by s
    info: dict = {"groups": {}, "clip": {}}

    # Candidates are compared with torch-order sums (GGML types fit several times faster);
    # the bytes and the quantized block below are made with the exact kernels.
    with search_precision():
        for group in groups:
            members = [block.get_submodule(n) for n in group.linears]
            first = group.linears[0]
            result = awq.search_scales(
                linears=members,
                inputs=collector.kept[first],
                run_inspect=_inspect_fn(block, group.inspect, kwargs),
                x_mean=stats[first].mean_abs,
                quantizers=[quantizers[n] for n in group.linears],
                importance=stats[first].mean_sq,
                n_grid=settings.n_grid,
                duo_scaling=settings.duo_scaling,
                refine=settings.search_grid == "refine",
                references=collector.kept_outputs.get(group.inspect),
            )
            info["groups"][f"{group.prev}->{','.join(group.linears)}"] = {
                "alpha": result.alpha,
                "loss_rtn": result.loss_rtn,
                "loss_awq": result.loss_best,
            }
            if result.alpha is None:
                continue
            awq.fold_scales(
                block.get_submodule(group.prev),
                members,
                result.scales,
                norm_plus_one=spec.norm_plus_one,
                prev_rows=group.prev_rows,
            )
            for name in group.linears:
                input_scale[name] = result.scales

        parts.lap("scale search")
        clips: dict[str, torch.Tensor | None] = {name: None for name in linears}
        if clip_enabled:
            for name, module in linears.items():
                if name.rsplit(".", 1)[-1] in spec.no_clip or name not in collector.kept:
                    continue
                x = _subsample_tokens(collector.kept[name], settings.clip_n_tokens)
                imp = stats[name].mean_sq
                if input_scale[name] is not None:
                    x = x / input_scale[name]
                    imp = imp / input_scale[name].square()
                ratios, before, after = clip.search_clip(
                    module.weight.data,
                    x,
                    quantizers[name],
                    imp,
                    n_grid=settings.clip_n_grid,
                    max_shrink=settings.clip_max_shrink,
                )
                clips[name] = ratios
                info["clip"][name] = {"loss_before": before, "loss_after": after}

    parts.lap("clip search")
    if candidates and search_inputs:
        info["candidate_errors"] = _measure_candidates(
            block, linears, quantizers, candidates, clips, stats, input_scale, search_inputs[0],
            kwargs, settings.clip_n_tokens, prefix,
        )  # fmt: skip
        parts.lap("candidate errors")
    if storage_dtype is not None:
        # The block file keeps the transformed tensors in the storage dtype; the quantized
        # model is made from exactly those values.
        for param in block.parameters():
            param.data = param.data.to(storage_dtype).to(param.dtype)
    float_state = {
        prefix + k: v.detach().clone().to(storage_dtype or v.dtype)
        for k, v in block.state_dict().items()
    }
    results: dict[str, LinearResult] = {}
    for name, module in linears.items():
        linear_stats = stats.get(name)
        mean_abs = linear_stats.mean_abs if linear_stats else None
        mean_sq = linear_stats.mean_sq if linear_stats else None
        if input_scale[name] is not None and linear_stats is not None:
            mean_abs = mean_abs / input_scale[name]
            mean_sq = mean_sq / input_scale[name].square()
        w = module.weight.data
        quantizer = quantizers[name]
        codes = None
        if quantizer.produces_codes:
            codes = quantizer.quantize_codes(w, clips[name])
            w_q = quantizer.fake_quant(w, mean_sq, clips[name])
            if clips[name] is not None:
                clipped = clamp_to_clip(w, quantizer.clip_group_size, clips[name])
                float_state[prefix + name + ".weight"] = clipped.to(storage_dtype or w.dtype)
        else:
            # The writer re-quantizes the saved float weight, so the quantized model is made
            # from it: the clipping applied, in the storage dtype.
            if clips[name] is not None:
                w = clamp_to_clip(w.float(), quantizer.clip_group_size, clips[name])
                w = w.to(storage_dtype or module.weight.dtype)
                float_state[prefix + name + ".weight"] = w
            w_q = quantizer.fake_quant(w.to(module.weight.dtype), mean_sq)
        checked = [("quantized weight", w_q), ("transformed weight", w)]
        if codes is not None:
            checked.append(("group scales", codes.scales))
        if mean_sq is not None:
            checked.append(("activation mean x²", mean_sq))
        check_result(f"block {index}, {prefix + name}", checked)

        results[prefix + name] = LinearResult(
            name=prefix + name,
            weight=float_state[prefix + name + ".weight"],
            codes=codes,
            mean_abs=mean_abs,
            mean_sq=mean_sq,
            n_tokens=linear_stats.n_tokens if linear_stats else 0,
        )
        module.weight.data = w_q.to(module.weight.dtype)

    parts.lap("quantize")
    info["block_loss_rtn"] = rtn_loss
    info["block_loss"] = None
    outputs = fp_outputs
    if propagate and inputs:
        del fp_outputs  # only its search batches are still needed: one stream less in memory
        outputs = run_block(block, inputs, kwargs)
        if search_inputs:
            info["block_loss"] = awq.mse(outputs[: len(search_inputs)], fp_search_outputs)
        parts.lap("propagation pass")
    elif search_inputs:
        info["block_loss"] = awq.mse(run_block(block, search_inputs, kwargs), fp_search_outputs)
        parts.lap("block loss pass")
    info["seconds"] = time.perf_counter() - started
    info["seconds_parts"] = parts.seconds
    return BlockResult(index, float_state, results, info), outputs


@contextmanager
def in_float32(block: nn.Module, kwargs: dict) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A function running ``block`` in float32 on its device (hidden states and ``kwargs``'
    floats cast too), whatever the block's dtype; the block is put back in its dtype after
    (exactly: its parameters were values of that dtype)."""
    dtype = next(block.parameters()).dtype
    device = next(block.parameters()).device
    kwargs32 = to_device(kwargs, device, torch.float32)
    block.float()

    def run(hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden.to(device=device, dtype=torch.float32), **kwargs32)
        return out[0] if isinstance(out, tuple) else out

    try:
        yield run
    finally:
        block.to(dtype)


def relative_token_weight(reference: torch.Tensor) -> torch.Tensor:
    """1 / ||y_t||² per token of ``reference`` [..., hidden] -> [...]: what makes an error
    relative to each token's output."""
    return 1 / reference.square().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)


def _measure_candidates(
    block, linears, planned, candidates, clips, stats, input_scale, inputs, kwargs, n_tokens,
    prefix,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each candidate linear's block output error under each of its candidate quantizers, on
    the first windows of ``inputs`` [batch, seq, hidden] that hold ``n_tokens`` tokens.

    Each error is relative to the block output, token by token: the mean over tokens of
    ||δ_t||² / ||y_t||². Every later block (and the head) reads the residual stream through an
    RMSNorm, which divides each token by its own norm, so that ratio is what the next block sees
    (to first order). Absolute errors starved the early blocks (the stream grows 700 x in norm
    over SmolLM2's blocks: Q3_K_M's size, KLD 0.115 against the fixed mix's 0.084); errors over
    the whole output's mean square (e4489b1) let the few tokens with massive activations set
    the scale and under-weighted SmolLM2's middle blocks; eval/results/proxy_vs_kld.md measures
    the three against the model's real KLD change (on Gemma-3 the two relative ones are about
    equal). What the same relative error costs still differs from block to block; the
    allocation multiplies each block's errors by its measured downstream gain
    (``calib.downstream``). ``preflight.CANDIDATE_ERROR_MEASURE`` names this measure: change
    it with it.
    Measured in float32 whatever the compute dtype: in bfloat16 the rounding of the large
    residual swamps the small errors of the wide types (a Q8_0 error would read as a multiple
    of the residual's ulp). The reference is the transformed, unquantized block's output in
    float32."""
    windows = max(1, -(-n_tokens // inputs.shape[1]))
    with in_float32(block, kwargs) as run32:
        x = inputs[:windows]

        def run() -> torch.Tensor:
            return run32(x)

        reference = run()
        token_weight = relative_token_weight(reference)  # [batch, seq]
        measured = {}
        for name, quantizers in candidates.items():
            module = linears[name]
            w_saved = module.weight.data
            if clips[name] is not None:  # what the writer quantizes: the weight clipped
                group = planned[name].clip_group_size
                w_saved = clamp_to_clip(w_saved, group, clips[name])
            importance = stats[name].mean_sq if name in stats else None
            if importance is not None and input_scale[name] is not None:
                importance = importance / input_scale[name].square()
            measured[prefix + name] = candidate_errors(
                module, w_saved, importance, quantizers, run, reference, token_weight
            )
    return measured


@torch.no_grad()
def candidate_errors(
    module: nn.Linear,
    w_saved: torch.Tensor,
    importance: torch.Tensor | None,
    quantizers: list[Quantizer],
    run: Callable[[], torch.Tensor],
    reference: torch.Tensor,
    token_weight: torch.Tensor | None = None,
) -> dict[str, float]:
    """The output error of ``run()`` (the block) with ``module``'s weight replaced by each
    quantizer's version of ``w_saved`` (what a writer quantizes), against ``reference``: summed
    over channels, times ``token_weight`` (shaped like ``reference`` without its last dimension;
    default 1), mean over tokens, so the errors of a model's linears add up. ``module``'s
    weight is restored."""
    original = module.weight.data
    errors = {}
    try:
        with search_precision():
            for quantizer in quantizers:
                w_q = quantizer.fake_quant(w_saved.float(), importance)
                module.weight.data = w_q.to(original.dtype)
                per_token = (run().float() - reference.float()).square().sum(-1)
                if token_weight is not None:
                    per_token = per_token * token_weight
                errors[quantizer.name] = per_token.mean().item()
    finally:
        module.weight.data = original
    return errors


class PartTimer:
    """Seconds per part of a block's quantization (the profile every report carries)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = round(self.seconds.get(part, 0.0) + now - self._last, 4)
        self._last = now


def _rtn_block_loss(block, linears, quantizers, inputs, references, kwargs) -> float:
    """Output MSE of the block with plain round-to-nearest weights (the search's baseline)."""
    originals = {name: m.weight.data for name, m in linears.items()}
    try:
        for name, module in linears.items():
            module.weight.data = quantizers[name].fake_quant(module.weight.data)
        return awq.mse(run_block(block, inputs, kwargs), references)
    finally:
        for name, module in linears.items():
            module.weight.data = originals[name]
