"""AWQ benchmark: llmquant RTN and AWQ against llm-compressor's AWQ on the default model.

For each scheme (int4 and int3, group 64, with zero point) it runs, each as a subprocess whose
wall time and peak RSS (``os.wait4`` rusage of that child) are recorded:
- llmquant RTN and llmquant AWQ (``python -m llmquant.run`` on recipes/llama_w4_rtn.yaml and
  recipes/llama_w4.yaml, evaluation off so the time is quantization only);
- llm-compressor ``oneshot`` with ``AWQModifier`` + ``QuantizationModifier`` on the first N of
  the same calibration windows (eval/bench_awq_llmcompressor.py in its own virtual environment,
  then a second process that dequantizes its checkpoint to a float folder).
Every model, and the FP32 source, is then evaluated here with llmquant's streamed evaluator on the
same held-out windows. The table goes to eval/results/awq_bench.md and .json and is printed.

    nice -n 10 python eval/bench_awq.py [--llmc-samples 8] [--quick] [--skip-llmcompressor]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: llmquant is the package here

from llmquant.cache import cache_root  # noqa: E402
from llmquant.evaluate.perplexity import perplexity_from_hidden  # noqa: E402
from llmquant.evaluate.streamed import final_hidden  # noqa: E402
from llmquant.formats import open_output  # noqa: E402
from llmquant.model.source import resolve_model  # noqa: E402
from llmquant.model.stream import StreamedModel  # noqa: E402
from llmquant.pipeline import load_windows  # noqa: E402
from llmquant.recipe import load_recipe  # noqa: E402
from llmquant.runfolder import RunFolder  # noqa: E402
from llmquant.tensors import load_all  # noqa: E402

sys.path.insert(0, str(REPO / "eval"))
from bench_common import (  # noqa: E402
    cached_step,
    digest,
    made_by_lines,
    result_header,
    run_measured,
    run_recipe,
    se_bars,
)

log = logging.getLogger("bench_awq")

VENV = Path.home() / ".cache" / "llmquant" / "venv-llmcompressor"
RESULTS = REPO / "eval" / "results"
# Round-to-nearest weights do not depend on calibration; the pipeline still runs its windows
# through every block (for the activation statistics it records), so fewer windows save time.
RTN_SET = ["calibration.n_samples=8"]
QUICK_SET = [
    "calibration.n_samples=2",
    "calibration.seq_len=128",
    "evaluation.n_windows=2",
    "evaluation.seq_len=128",
]


def evaluate(streamed: StreamedModel, windows: torch.Tensor, batch_size: int, desc: str) -> dict:
    started = time.perf_counter()
    hidden = final_hidden(streamed, windows, batch_size, desc=desc)
    result = perplexity_from_hidden(streamed.logits, hidden, windows)
    return {
        "ppl": result.ppl,
        "ppl_se": result.ppl_se,
        "nll": result.nll,
        "n_tokens": result.n_tokens,
        "eval_s": round(time.perf_counter() - started, 2),
    }


def llmquant_step(
    args, name: str, recipe_file: str, bits: int, overrides: list[str], work: Path
) -> dict:
    out = work / name
    sets = [
        f"quant.bits={bits}",
        "evaluation.enabled=false",
        "export=[]",  # the block results are evaluated; compressed-tensors has no int3
        *overrides,
        *([f"threads={args.torch_threads}"] if args.torch_threads else []),
    ]
    measured, report = run_recipe(recipe_file, out, sets, work / f"{out.name}.log")
    return {**measured, "out": str(out), "timings": report["timings"], "recipe": report["recipe"]}


def llmc_step(
    args, bits: int, n_samples: int, model_dir: Path, calib_path: Path, work: Path
) -> dict:
    python = str(args.venv / "bin" / "python")
    script = str(REPO / "eval" / "bench_awq_llmcompressor.py")
    stem = f"llmc_w{bits}_n{n_samples}"
    compressed, dense = work / stem, work / f"{stem}_dense"
    q_json, d_json = work / f"{stem}_quantize.json", work / f"{stem}_dequant.json"
    quantize_cmd = [
        python, script, "quantize", "--model", str(model_dir), "--calib", str(calib_path),
        "--n-samples", str(n_samples), "--bits", str(bits), "--group-size", "64",
        "--n-grid", str(args.llmc_n_grid), "--out", str(compressed), "--result", str(q_json),
    ]  # fmt: skip
    measured = run_measured(quantize_cmd, work / f"{stem}_quantize.log")
    dequant_cmd = [
        python, script, "dequantize", "--compressed", str(compressed), "--source",
        str(model_dir), "--group-size", "64", "--out", str(dense), "--result", str(d_json),
    ]  # fmt: skip
    run_measured(dequant_cmd, work / f"{stem}_dequant.log")
    inner = json.loads(q_json.read_text())
    check = reader_check(compressed, dense)
    return {**measured, "inner": inner, "dense": str(dense), "reader_check": check}


def reader_check(compressed: Path, dense: Path) -> dict:
    """Our compressed-tensors reader against transformers' decompression of the same file."""
    try:
        from safetensors.torch import load_file

        ours = load_all(open_output(compressed)[0])
        theirs = load_file(str(dense / "model.safetensors"))
        diff = max((ours[k].float() - v).abs().max().item() for k, v in theirs.items())
        return {"max_abs_diff": diff, "n_tensors": len(theirs)}
    except Exception as err:  # informative only; the evaluation uses the dense folder
        return {"error": f"{type(err).__name__}: {err}"}


def fmt_gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(doc: dict) -> str:
    base = doc["fp32"]["ppl"]
    lines = [
        "| scheme | method | calibration | PPL ± se | PPL / FP32 | quantization wall time | "
        "CPU time | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 | none | - | {base:.3f} ± {doc['fp32']['ppl_se']:.3f} | 1.000 | - | - | - |",
    ]
    for row in doc["rows"]:
        lines.append(
            f"| {row['scheme']} | {row['method']} | {row['calibration']} | "
            f"{row['ppl']:.3f} ± {row['ppl_se']:.3f} | {row['ppl'] / base:.3f} | "
            f"{row['wall_s']:.0f} s | {row['cpu_s']:.0f} s | {fmt_gib(row['peak_rss_bytes'])} |"
        )
    return "\n".join(lines)


def comparisons(doc: dict) -> list[str]:
    """Per scheme: each llmquant AWQ row against llm-compressor's, in CPU seconds and PPL."""
    lines = []
    for scheme in dict.fromkeys(row["scheme"] for row in doc["rows"]):
        rows = [row for row in doc["rows"] if row["scheme"] == scheme]
        theirs = next((r for r in rows if r["method"] == "llm-compressor AWQ"), None)
        if theirs is None:
            continue
        for ours in (r for r in rows if r["method"].startswith("llmquant AWQ")):
            lines.append(
                f"- {scheme}, {ours['method']} at {ours['calibration'].split(' (')[0]}: "
                f"{ours['cpu_s'] / theirs['cpu_s']:.2f} x llm-compressor's CPU seconds "
                f"({ours['cpu_s']:.0f} vs {theirs['cpu_s']:.0f} s), PPL {ours['ppl']:.3f} vs "
                f"{theirs['ppl']:.3f} ({se_bars(ours, theirs, 'ppl')} the +-1 se bars)"
            )
    return lines


def markdown(doc: dict) -> str:
    ev = doc["evaluation"]
    vers = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    llmc_vers = doc.get("llmcompressor_versions")
    parts = [
        "# AWQ benchmark: llmquant vs llm-compressor",
        "",
        f"- date: {doc['date']}",
        f"- command: `{doc['command']}`",
        f"- machine: {doc['machine']}",
        f"- llmquant code: {doc['git']}",
        f"- model: {doc['model_dir']} (SmolLM2-135M-Instruct, fp32 dequantized from Q4_1 GGUF)",
        f"- evaluation: {ev['windows']} held-out windows x {ev['seq_len']} tokens of the default "
        "Wikipedia text, llmquant's streamed evaluator for every row (same windows)",
        f"- main environment: {vers}",
    ]
    if llmc_vers:
        parts.append(
            "- llm-compressor environment: " + ", ".join(f"{k} {v}" for k, v in llmc_vers.items())
        )
    parts += [
        "- wall time, CPU time (user + system) and peak RSS: the quantizing process alone (model "
        "load, calibration, search, save; no evaluation), from its `wait4` rusage; the machine "
        "was shared with other jobs, so CPU time is the steadier comparison",
        "",
        render(doc),
        "",
        *comparisons(doc),
        "",
        "Rows made by:",
        *made_by_lines(doc["rows"]),
        "",
    ]
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument(
        "--llmc-samples",
        type=int,
        nargs="+",
        default=[8],
        help="llm-compressor calibration windows: one value, or one per --bits entry (0 skips)",
    )
    parser.add_argument("--llmc-n-grid", type=int, default=20)
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument(
        "--torch-threads", type=int, help="torch threads of the llmquant runs (recipe `threads`)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke test settings")
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--work", type=Path, default=cache_root() / "bench_awq")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--reuse", action="store_true", help="reuse finished steps in --work")
    args = parser.parse_args(argv)
    if len(args.llmc_samples) == 1:
        args.llmc_samples = args.llmc_samples * len(args.bits)
    if len(args.llmc_samples) != len(args.bits):
        parser.error("--llmc-samples takes one value or one per --bits entry")
    if args.quick:
        args.llmc_samples = [min(n, 2) for n in args.llmc_samples]
        args.llmc_n_grid = min(args.llmc_n_grid, 3)
        args.work = args.work.with_name(args.work.name + "_quick")
        args.results = args.work  # a smoke test never overwrites the committed results
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    overrides = QUICK_SET if args.quick else []
    args.work.mkdir(parents=True, exist_ok=True)

    recipe = load_recipe(REPO / "recipes" / "llama_w4.yaml", overrides)
    model_dir = resolve_model(recipe.model.source, recipe.model.revision, recipe.model.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib, windows = load_windows(recipe, model_dir, tokenizer)
    calib_path = args.work / "calibration_windows.pt"
    torch.save(calib, calib_path)
    n_cal, seq = calib.shape
    batch = recipe.evaluation.batch_size

    fp32 = cached_step(
        args.work / "fp32_eval.json",
        args.reuse,
        lambda: evaluate(StreamedModel(model_dir), windows, batch, "fp32"),
        key={"eval": "fp32", "model": str(model_dir), "windows": digest(windows), "batch": batch},
    )
    llmc_versions = None
    rows = []
    for bits, llmc_samples in zip(args.bits, args.llmc_samples):
        scheme = f"int{bits} g64 asym"
        runs = [("rtn", "RTN", "llama_w4_rtn.yaml", [*overrides, *RTN_SET], "none (RTN)")]
        runs.append(("awq", "AWQ", "llama_w4.yaml", overrides, f"{n_cal} x {seq}"))
        if llmc_samples and not args.skip_llmcompressor:
            # llm-compressor's exact calibration: the first llmc_samples of the same windows
            # (the windows are consecutive text, so n_samples=N gives calib[:N]; checked here).
            same = load_recipe(REPO / "recipes" / "llama_w4.yaml",
                               [*overrides, f"calibration.n_samples={llmc_samples}"])  # fmt: skip
            if not torch.equal(load_windows(same, model_dir, tokenizer)[0], calib[:llmc_samples]):
                raise RuntimeError("n_samples windows are not the first calibration windows")
            small = [*overrides, f"calibration.n_samples={llmc_samples}"]
            at = f"{llmc_samples} x {seq} (llm-compressor's windows)"
            runs.append((f"awq_n{llmc_samples}", "AWQ", "llama_w4.yaml", small, at))
            runs.append((f"awq_n{llmc_samples}_noclip", "AWQ, clip off", "llama_w4.yaml",
                         [*small, "awq.clip=false"], at))  # fmt: skip
        for slug, method, recipe_file, sets, calibration in runs:
            name = f"llmquant_{slug}_w{bits}"
            step = cached_step(
                args.work / f"{name}.json",
                args.reuse,
                llmquant_step,
                args,
                name,
                f"recipes/{recipe_file}",
                bits,
                sets,
                args.work,
                key={"recipe": recipe_file, "bits": bits, "threads": args.torch_threads,
                     "overrides": sets},
            )  # fmt: skip
            run = RunFolder.open(Path(step["out"]) / "blocks")
            evaluated = cached_step(
                args.work / f"{name}_eval.json",
                args.reuse,
                evaluate,
                StreamedModel(run.source_dir, index=run.tensors(quantized=True)),
                windows,
                batch,
                name,
                key={"eval": name, "run": digest(step), "windows": digest(windows), "batch": batch},
            )
            awq, calib_recipe = step["recipe"]["awq"], step["recipe"]["calibration"]
            if method != "RTN":
                # the searches take at most their token budget of the calibration's tokens
                tokens = calib_recipe["n_samples"] * calib_recipe["seq_len"]
                clip_tokens = min(awq["clip_n_tokens"], tokens)
                clip = f"clip on {clip_tokens}" if awq["clip"] else "no clip search"
                search_tokens = min(awq["search_n_tokens"], tokens)
                calibration += f" (stats); scale search on {search_tokens} tokens, {clip}"
            rows.append(
                {
                    "scheme": scheme,
                    "method": f"llmquant {method}",
                    "calibration": calibration,
                    **evaluated,
                    "wall_s": step["wall_s"],
                    "cpu_s": step["cpu_s"],
                    "peak_rss_bytes": step["peak_rss_bytes"],
                    "timings": step["timings"],
                    "command": step["command"],
                    "made_by": step["made_by"],
                }
            )
        if args.skip_llmcompressor or llmc_samples == 0:
            continue
        name = f"llmcompressor_awq_w{bits}_n{llmc_samples}"
        step = cached_step(
            args.work / f"{name}.json",
            args.reuse,
            llmc_step,
            args,
            bits,
            llmc_samples,
            model_dir,
            calib_path,
            args.work,
            key={
                "bits": bits, "samples": llmc_samples, "model": str(model_dir),
                "calibration": digest(calib_path), "n_grid": args.llmc_n_grid,
                "venv": str(args.venv),
            },
        )  # fmt: skip
        llmc_versions = step["inner"]["versions"]
        evaluated = cached_step(
            args.work / f"{name}_eval.json",
            args.reuse,
            evaluate,
            StreamedModel(Path(step["dense"])),
            windows,
            batch,
            name,
            key={"eval": name, "run": digest(step), "windows": digest(windows), "batch": batch},
        )
        inner = step["inner"]
        rows.append(
            {
                "scheme": scheme,
                "method": "llm-compressor AWQ",
                "calibration": f"{inner['n_samples']} x {inner['seq_len']} (first windows of "
                f"ours), n_grid {inner['n_grid']}",
                **evaluated,
                "wall_s": step["wall_s"],
                "cpu_s": step["cpu_s"],
                "peak_rss_bytes": step["peak_rss_bytes"],
                "timings": {k: inner[k] for k in ("load_s", "oneshot_s", "save_s")},
                "command": step["command"],
                "made_by": step["made_by"],
                "reader_check": step["reader_check"],
            }
        )

    doc = {
        **result_header(command, args.quick, model_dir),
        "evaluation": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        "calibration": {"windows": n_cal, "seq_len": seq},
        "llmcompressor_versions": llmc_versions,
        "fp32": fp32,
        "rows": rows,
    }
    stem = "awq_bench"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    (args.results / f"{stem}.md").write_text(markdown(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
