"""The only orchestrator: the numbered steps of ARCHITECTURE.md, one decoder block at a time.

The baseline and the quantized model are evaluated in the same pass: while block i is loaded,
the full-precision evaluation stream goes through the original block and the quantized stream
through the quantized one, so both perplexities use the same windows and each block is read once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from llmquant.calib import downstream
from llmquant.calib.block import PartTimer, planned_linears, quantize_block
from llmquant.calib.capture import BlockInputs, capture_inputs, run_block
from llmquant.data import text as textdata
from llmquant.dtypes import DTYPES, dtype_name
from llmquant.errors import InputError
from llmquant.evaluate.perplexity import perplexity_from_hidden
from llmquant.formats import PlanContext
from llmquant.model.arch import resolve_arch
from llmquant.model.device import (
    device_budget,
    peak_device_bytes,
    place_batches,
    predicted_peak_rss,
    resolve_compute_dtype,
    resolve_device,
)
from llmquant.model.source import resolve_model
from llmquant.model.stream import StreamedModel
from llmquant.preflight import (
    FINGERPRINT_PARTS,
    calibration_needed,
    fingerprint,
    fingerprint_parts,
    make_plan,
    measured_candidates,
    plan_exports,
    target_linears,
    text_digest,
    writer_buffer_bytes,
)
from llmquant.recipe import Recipe, check_against_model
from llmquant.report import remove_report, write_report
from llmquant.runfolder import RunFolder
from llmquant.tensors import config_dtype, iter_tensors, read_config
from llmquant.values import check_perplexity, check_source

log = logging.getLogger(__name__)

@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, step: str, started: float) -> None:
        self.seconds[step] = round(self.seconds.get(step, 0.0) + time.perf_counter() - started, 3)


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

    base_key = {
        "data": data.model_dump(),
        "tok": textdata.tokenizer_fingerprint(model_dir),
        "content": text_digest(recipe),  # a local text is keyed on its bytes, not its name
    }
    parts = (
        ("calibration", 0, recipe.calibration.n_samples, recipe.calibration.seq_len),
        ("evaluation", 1, recipe.evaluation.n_windows, recipe.evaluation.seq_len),
    )
    windows = []
    for part, k, n, seq_len in parts:
        try:
            windows.append(
                textdata.cached_windows(
                    tokenizer,
                    {**base_key, "part": part, "n": n, "s": seq_len},
                    lambda k=k: split()[k],
                    n,
                    seq_len,
                )
            )
        except textdata.TextTooShort as err:
            raise textdata.too_short_for(err, part, data.source) from None
    calib, evals = windows
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


def open_run_folder(
    blocks_dir: Path, fresh: RunFolder, resume: bool
) -> tuple[RunFolder, list[bool]]:
    """The run folder to fill and which blocks it holds already. ``--resume`` keeps the saved
    blocks of a folder made by the same recipe and model, with the plan persisted there."""
    if resume and (blocks_dir / "manifest.json").is_file():
        try:
            previous = RunFolder.open(blocks_dir)
        except InputError as err:
            raise InputError(
                f"{err}; --resume cannot use it: delete {blocks_dir} to start over, or use a "
                "new --out"
            ) from None
        if previous.fingerprint != fresh.fingerprint:
            changed = [
                FINGERPRINT_PARTS.get(k, k)
                for k in sorted(set(previous.fingerprint_parts) | set(fresh.fingerprint_parts))
                if previous.fingerprint_parts.get(k) != fresh.fingerprint_parts.get(k)
            ]
            what = f" ({'; '.join(changed)} changed)" if changed else ""
            raise InputError(
                f"{blocks_dir}: --resume with a different recipe or model{what}; use a new "
                "--out, or run without --resume to start over"
            )
        if previous.plan.to_json() != fresh.plan.to_json():
            raise InputError(
                f"{blocks_dir}: --resume, but this llmquant version plans the linears "
                "differently from the one that made the folder; use a new --out"
            )
        fresh.plan = previous.plan
        for i in range(fresh.n_blocks):
            problem = fresh.block_problem(i) if fresh.has_block(i) else None
            if problem:
                log.warning("%s: %s; recomputing this block", fresh.block_path(i), problem)
                fresh.block_path(i).unlink()
    elif blocks_dir.exists():
        stale = sorted(blocks_dir.glob("block_*.safetensors"))
        if stale:
            log.warning(
                "%s holds %d finished block(s) of an earlier run; discarding them (run with "
                "--resume to keep them)", blocks_dir, len(stale),
            )  # fmt: skip
        for path in stale:
            path.unlink()
    fresh.write_manifest()
    saved = [resume and fresh.has_block(i) for i in range(fresh.n_blocks)]
    return fresh, saved


def run(recipe: Recipe, out_dir: Path, resume: bool = False) -> dict:
    """Run a validated recipe; return the report dict (also written to ``out_dir``)."""
    timings = Timings()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)

    started = time.perf_counter()
    model_dir = resolve_model(recipe.model.source, recipe.model.revision, recipe.model.gguf_file)
    timings.add("source", started)

    started = time.perf_counter()
    config = read_config(model_dir)
    dtype = config_dtype(config) if recipe.model.dtype == "auto" else DTYPES[recipe.model.dtype]
    device = resolve_device(recipe.runtime.device)
    compute_dtype = resolve_compute_dtype(recipe.runtime.compute_dtype, device)
    streamed = StreamedModel(model_dir, compute_dtype, device=device, outer_dtype=dtype)
    element = torch.empty((), dtype=compute_dtype).element_size()
    budget = device_budget(recipe.runtime.max_device_gb, device, streamed.block_numel() * element)
    # One pass over the stored tensors before any work: finite, and (narrowing to float16)
    # within float16's range.
    narrowing = dtype == torch.float16 and config_dtype(config) != dtype
    narrow_to = dtype if narrowing else None
    check_source(iter_tensors(streamed.index), str(model_dir), narrow_to=narrow_to)
    first = streamed.load_block(0)
    spec = resolve_arch(getattr(streamed.config, "architectures", None), first)
    streamed.free_block(0)
    ctx = PlanContext(
        config, streamed.index, target_linears(streamed, recipe.quant.ignore), dtype, model_dir
    )
    plan = make_plan(recipe, ctx)
    exports = plan_exports(recipe, plan, ctx)
    measured = measured_candidates(recipe, ctx)
    check_against_model(recipe, config, model_dir / "config.json")
    timings.add("arch", started)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib_windows, eval_windows = load_windows(recipe, model_dir, tokenizer)
    timings.add("data", started)

    started = time.perf_counter()
    use_calibration = calibration_needed(recipe, plan, exports, measured)
    if use_calibration:
        calib = capture_inputs(streamed, calib_windows, recipe.evaluation.batch_size)
    else:
        log.info("round-to-nearest and no writer reads statistics: no calibration pass")
        calib = BlockInputs([], [{}] * streamed.n_blocks)
    evaluate = recipe.evaluation.enabled
    eval_base = eval_quant = None
    if evaluate:
        eval_base = capture_inputs(streamed, eval_windows, recipe.evaluation.batch_size)
        eval_quant = eval_base.clone()
    streams = [calib] + ([eval_base, eval_quant] if evaluate else [])
    stream_bytes = sum(b.numel() * b.element_size() for s in streams for b in s.batches)
    on_device = budget.streams_fit(2 * stream_bytes)  # x2: each block's outputs beside them
    for stream in streams:
        stream.batches = place_batches(stream.batches, device, on_device)
    timings.add("capture", started)

    parts = fingerprint_parts(recipe, model_dir, compute_dtype)
    fresh = RunFolder(
        out_dir / "blocks",
        model_dir,
        streamed.n_blocks,
        fingerprint(parts),
        plan,
        layers_path=streamed.layers_path,
        dtype=dtype_name(dtype),
        exports={e.name: e.plan for e in exports},
        fingerprint_parts=parts,
    )
    remove_report(out_dir)
    run_folder, saved = open_run_folder(out_dir / "blocks", fresh, resume)
    plan = run_folder.plan
    search_batches = _search_batches(recipe, calib)
    gain = downstream.for_measured_tokens(calib.batches, recipe.awq.clip_n_tokens, measured)
    block_info = []
    started = time.perf_counter()
    progress = tqdm(range(streamed.n_blocks), desc=f"quantizing ({plan.name})", unit="block")
    passes = PartTimer()  # the block loop's own parts; quantize_block times its parts
    profile: dict[str, float] = {}
    for i in progress:
        passes.lap("other")
        block = streamed.load_block(i)
        passes.lap("load block")
        kwargs = calib.kwargs[i]
        if gain is not None:  # before the block is searched: it needs the loaded weights
            noised = planned_linears(block, streamed.block_prefix(i), measured)
            gain.step(i, block, kwargs, list(noised.values()))
            passes.lap("downstream gains")
        # Once every later block is saved, the calibration stream is needed no more.
        calib_needed = not all(saved[i + 1 :])
        if evaluate:
            eval_base.batches = run_block(block, eval_base.batches, eval_base.kwargs[i])
            passes.lap("evaluation passes")
        # The next block's inputs: this block's outputs, quantized or full precision.
        propagate = recipe.awq.propagate_quantized and calib_needed
        if saved[i]:
            result = run_folder.block(i)
            fp_needed = calib_needed and not propagate
            fp_outputs = run_block(block, calib.batches, kwargs) if fp_needed else []
            streamed.load_block(i, run_folder.quantized_tensors(result))
            outputs = run_block(block, calib.batches, kwargs) if propagate else fp_outputs
            passes.lap("saved block (resume)")
        else:
            result, outputs = quantize_block(
                i,
                block,
                streamed.block_prefix(i),
                spec,
                plan.quantizers,
                calib.batches,
                kwargs,
                recipe.awq,
                search_batches,
                storage_dtype=dtype if dtype != compute_dtype else None,
                candidates=measured,
                propagate=propagate,
            )
            passes.lap("quantize block")
            for part, seconds in result.info.get("seconds_parts", {}).items():
                profile[part] = round(profile.get(part, 0.0) + seconds, 3)
            run_folder.save_block(result)
            passes.lap("save block")
        calib.batches = outputs if calib_needed else []
        if evaluate:
            eval_quant.batches = run_block(block, eval_quant.batches, eval_quant.kwargs[i])
            passes.lap("evaluation passes")
        info = result.info
        block_info.append({"block": i, **info})
        rtn, final = info.get("block_loss_rtn"), info.get("block_loss")
        if rtn:
            progress.set_postfix(loss_vs_rtn=f"{final / rtn:.3f}")
        # Memory is one block: its result and outputs go before the next block loads.
        del result, outputs
        streamed.free_block(i)
    if gain is not None:
        downstream.with_gains(block_info, gain.gains(streamed.logits))
        passes.lap("downstream gains")
    timings.add("quantize", started)
    passes.lap("other")
    loop = {k: round(v, 3) for k, v in passes.seconds.items() if k != "quantize block"}
    report_profile = {**loop, **profile}

    report: dict = {"blocks": block_info, "arch": spec.name, "quantizer": plan.name}
    ppl: dict[str, float] = {}
    if evaluate:
        started = time.perf_counter()
        base = perplexity_from_hidden(streamed.logits, eval_base.batches, eval_windows)
        quant = perplexity_from_hidden(streamed.logits, eval_quant.batches, eval_windows)
        if compute_dtype != torch.float32 and not math.isfinite(base.ppl):
            # Finite weights, non-finite full-precision outputs: the narrow compute dtype
            # overflowed, which the user can change.
            raise InputError(
                f"runtime.compute_dtype {dtype_name(compute_dtype)}: the full-precision model's "
                "outputs overflow in it (baseline perplexity is not finite); use float32"
            )
        ppl = {
            "baseline": check_perplexity("baseline", base.ppl),
            "quantized": check_perplexity("quantized", quant.ppl),
        }
        report["ppl_detail"] = {"baseline": base.as_dict(), "quantized": quant.as_dict()}
        timings.add("evaluate", started)

    for export in exports:
        allocation = export.fmt.finish_plan(
            run_folder, export.name, export.section, recipe.quant, ctx, block_info
        )
        if allocation is not None:
            # ppl.quantized is of the searched types; the allocated file is evaluated on its
            # own (python -m llmquant.eval, or llama.cpp).
            report.setdefault("allocation", {})[export.name] = allocation

    started = time.perf_counter()
    outputs: dict[str, str] = {}
    for export in exports:
        written = export.fmt.write(run_folder, export.name, export.section, out_dir, recipe.name)
        outputs.update(written)
        log.info("exported %s", export.name)
        allocation = report.get("allocation", {}).get(export.name)
        if allocation is not None:
            target = written[allocation.pop("output")]
            allocation["file"] = target
            if Path(target).is_file():  # a folder export has no one file size
                allocation["file_bytes"] = Path(target).stat().st_size
    timings.add("export", started)

    report["runtime"] = {
        "device": str(device),
        "dtype": dtype_name(dtype),
        "compute_dtype": dtype_name(compute_dtype),
        "streams_on": "device" if on_device and device.type != "cpu" else "host",
        "peak_device_bytes": peak_device_bytes(device),
        "predicted_peak_rss_bytes": predicted_peak_rss(
            streamed, dtype, 0 if on_device else stream_bytes,
            writer_buffer_bytes(streamed, dtype, exports),
        ),  # fmt: skip
    }
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
                "calibration_used": use_calibration,
                "calibration_seq_len": int(calib_windows.shape[1]),
            },
        }
    )
    report["timings"] = timings.seconds
    # Seconds of the block loop by part, summed over blocks (what a speed change must show).
    report["profile"] = dict(sorted(report_profile.items(), key=lambda kv: -kv[1]))
    return write_report(recipe, report, out_dir)
