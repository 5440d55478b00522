"""The only orchestrator: the numbered steps of DESIGN.md, one decoder block at a time.

The baseline and the quantized model are evaluated in the same pass: while block i is loaded,
the full-precision evaluation stream goes through the original block and the quantized stream
through the quantized one, so both perplexities use the same windows and each block is read once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from llmquant.calib.capture import BlockInputs, capture_inputs, run_block
from llmquant.data import text as textdata
from llmquant.evaluate.perplexity import perplexity_from_hidden
from llmquant.exporters import export_all
from llmquant.model.arch import resolve_arch
from llmquant.model.source import resolve_model
from llmquant.model.stream import StreamedModel
from llmquant.quant.block import SearchSettings, block_linears, quantize_block
from llmquant.quant.grid import IntGrid, dequantize
from llmquant.quant.quantizers import IntQuantizer, QuantizerPlan
from llmquant.quant.results import QuantizedRun, block_file, save_block
from llmquant.recipe import Recipe
from llmquant.report import write_report

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad input found before anything was written; run.py turns it into exit code 2."""


@dataclass
class RunState:
    recipe: Recipe
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def timed(self, step: str, started: float) -> None:
        self.timings[step] = round(self.timings.get(step, 0.0) + time.perf_counter() - started, 3)


def make_quantizer_plan(recipe: Recipe, streamed: StreamedModel) -> QuantizerPlan:
    """Which quantizer each linear is searched and quantized with (DESIGN.md principle 4)."""
    q = recipe.quant
    if q.format == "int":
        quantizer = IntQuantizer(
            IntGrid(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)
        )
        return QuantizerPlan(quantizer.name, lambda _name: quantizer)
    from llmquant.export.gguf.plan import gguf_quantizer_plan

    return gguf_quantizer_plan(q.gguf_mix, streamed)


def check_shapes(streamed: StreamedModel, plan: QuantizerPlan, ignore: list[str]) -> None:
    """Every quantized linear fits its quantizer; InputError naming the layer otherwise."""
    for i in range(streamed.n_blocks):
        prefix = streamed.block_prefix(i)
        for name, module in block_linears(streamed.layers[i], prefix, ignore).items():
            try:
                plan.quantizer_for(prefix + name).check(prefix + name, module.in_features)
            except ValueError as err:
                raise InputError(str(err)) from None


def fingerprint(recipe: Recipe, model_dir: Path) -> str:
    """Hash of what changes block results (resume refuses a folder made by another recipe)."""
    doc = {
        "model": str(model_dir),
        "quant": recipe.quant.model_dump(),
        "awq": recipe.awq.model_dump(),
        "calibration": recipe.calibration.model_dump(),
        "data": recipe.data.model_dump(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_windows(recipe: Recipe, model_dir: Path, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    data = recipe.data
    docs: dict = {}

    def split() -> tuple[list[str], list[str]]:
        if not docs:
            all_docs = textdata.load_documents(
                data.source, data.text_field, data.config_name, data.split
            )
            docs["c"], docs["e"] = textdata.split_documents(all_docs, data.eval_fraction, data.seed)
        return docs["c"], docs["e"]

    base_key = {"data": data.model_dump(), "tok": textdata.tokenizer_fingerprint(model_dir)}
    cal, ev = recipe.calibration, recipe.evaluation
    calib = textdata.cached_windows(
        tokenizer,
        {**base_key, "part": "calibration", "n": cal.n_samples, "s": cal.seq_len},
        lambda: split()[0],
        cal.n_samples,
        cal.seq_len,
    )
    evals = textdata.cached_windows(
        tokenizer,
        {**base_key, "part": "evaluation", "n": ev.n_windows, "s": ev.seq_len},
        lambda: split()[1],
        ev.n_windows,
        ev.seq_len,
    )
    return calib, evals


def _search_batches(recipe: Recipe, calib: BlockInputs) -> int:
    """How many calibration batches the searches use: enough for ``search_n_tokens``."""
    tokens, count = 0, 0
    for batch in calib.batches:
        if tokens >= recipe.awq.search_n_tokens:
            break
        tokens += batch.shape[0] * batch.shape[1]
        count += 1
    return max(count, 1)


def run(recipe: Recipe, out_dir: Path, resume: bool = False) -> dict:
    """Run a validated recipe; return the report dict (also written to ``out_dir``)."""
    state = RunState(recipe, out_dir)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)

    started = time.perf_counter()
    model_dir = resolve_model(recipe.model.source, recipe.model.revision, recipe.model.gguf_file)
    state.timed("source", started)

    started = time.perf_counter()
    streamed = StreamedModel(model_dir, recipe.model.dtype)
    first = streamed.load_block(0)
    spec = resolve_arch(getattr(streamed.config, "architectures", None), first)
    streamed.free_block(0)
    plan = make_quantizer_plan(recipe, streamed)
    check_shapes(streamed, plan, recipe.quant.ignore)
    state.timed("arch", started)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib_windows, eval_windows = load_windows(recipe, model_dir, tokenizer)
    state.timed("data", started)

    started = time.perf_counter()
    calib = capture_inputs(streamed, calib_windows, recipe.evaluation.batch_size)
    evaluate = recipe.evaluation.enabled
    eval_base = capture_inputs(streamed, eval_windows, recipe.evaluation.batch_size)
    eval_quant = eval_base.clone() if evaluate else None
    state.timed("capture", started)

    blocks_dir = out_dir / "blocks"
    run_result = QuantizedRun(
        blocks_dir, model_dir, streamed.n_blocks, fingerprint(recipe, model_dir)
    )
    if resume and (blocks_dir / "manifest.json").is_file():
        previous = QuantizedRun.open(blocks_dir)
        if previous.fingerprint != run_result.fingerprint:
            raise InputError(
                f"{blocks_dir}: --resume with a different recipe or model; use a new --out"
            )
    elif blocks_dir.exists():
        for stale in blocks_dir.glob("block_*.safetensors"):
            stale.unlink()
    run_result.write_manifest()

    settings = SearchSettings(
        awq=recipe.awq.enabled,
        n_grid=recipe.awq.n_grid,
        duo_scaling=recipe.awq.duo_scaling,
        clip=recipe.awq.enabled and recipe.awq.clip,
        clip_n_grid=recipe.awq.clip_n_grid,
        clip_max_shrink=recipe.awq.clip_max_shrink,
        clip_n_tokens=recipe.awq.clip_n_tokens,
        search_batches=_search_batches(recipe, calib),
    )
    block_info = []
    started = time.perf_counter()
    saved = [resume and run_result.has_block(i) for i in range(streamed.n_blocks)]
    progress = tqdm(range(streamed.n_blocks), desc=f"quantizing ({plan.name})", unit="block")
    for i in progress:
        block = streamed.load_block(i)
        kwargs = calib.kwargs[i]
        # Once every later block is saved, the calibration stream is needed no more.
        calib_needed = not all(saved[i + 1 :])
        if evaluate:
            eval_base.batches = run_block(block, eval_base.batches, eval_base.kwargs[i])
        if saved[i]:
            result = run_result.block(i)
            fp_outputs = run_block(block, calib.batches, kwargs) if calib_needed else []
            _load_quantized(streamed, i, result, plan)
        else:
            result, fp_outputs = quantize_block(
                i,
                block,
                streamed.block_prefix(i),
                spec,
                plan.quantizer_for,
                calib.batches,
                kwargs,
                recipe.quant.ignore,
                settings,
            )
            save_block(block_file(blocks_dir, i), result)
        if not calib_needed:
            calib.batches = []
        elif recipe.awq.propagate_quantized:
            calib.batches = run_block(block, calib.batches, kwargs)
        else:
            calib.batches = fp_outputs
        if evaluate:
            eval_quant.batches = run_block(block, eval_quant.batches, eval_quant.kwargs[i])
        info = result.info
        block_info.append({"block": i, **info})
        rtn, final = info.get("block_loss_rtn"), info.get("block_loss")
        if rtn:
            progress.set_postfix(loss_vs_rtn=f"{final / rtn:.3f}")
        streamed.free_block(i)
    state.timed("quantize", started)

    report: dict = {"blocks": block_info, "arch": spec.name, "quantizer": plan.name}
    ppl: dict[str, float] = {}
    if evaluate:
        started = time.perf_counter()
        base = perplexity_from_hidden(streamed.logits, eval_base.batches, eval_windows)
        quant = perplexity_from_hidden(streamed.logits, eval_quant.batches, eval_windows)
        ppl = {"baseline": base.ppl, "quantized": quant.ppl}
        report["ppl_detail"] = {"baseline": base.as_dict(), "quantized": quant.as_dict()}
        state.timed("evaluate", started)

    started = time.perf_counter()
    outputs = export_all(recipe, run_result, out_dir)
    state.timed("export", started)

    report.update(
        {
            "model_dir": str(model_dir),
            "ppl": ppl,
            "outputs": outputs,
            "eval": {
                "text": recipe.data.source,
                "windows": int(eval_windows.shape[0]),
                "seq_len": int(eval_windows.shape[1]),
                "tokens": int(eval_windows.numel()),
                "calibration_windows": int(calib_windows.shape[0]),
                "calibration_seq_len": int(calib_windows.shape[1]),
            },
        }
    )
    report["timings"] = state.timings
    return write_report(recipe, report, out_dir)


def _load_quantized(streamed: StreamedModel, index: int, result, plan: QuantizerPlan) -> None:
    """Put a saved block result into the loaded block: transformed floats, then grid weights.

    Clipping is already in the saved float weight, so quantizing it again reproduces the run.
    """
    tensors = dict(result.tensors)
    for name, lin in result.linears.items():
        if lin.codes is not None:
            tensors[name + ".weight"] = dequantize(lin.codes)
        else:
            quantizer = plan.quantizer_for(name)
            tensors[name + ".weight"] = quantizer.fake_quant(lin.weight.float(), lin.mean_sq)
    streamed.load_block(index, tensors)
