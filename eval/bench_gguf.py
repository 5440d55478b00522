"""GGUF benchmark: llmquant's activation-aware GGUF files against llama-quantize's own.

For each llama.cpp type (default Q4_0, Q4_K_M, Q3_K_M) on the default model it makes three files
of the same mix, each timed as a subprocess (wall time and peak RSS from ``os.wait4``):
- llama.cpp: ``llama-quantize`` of the F32 GGUF (written by llmquant's writer, which the tests
  check byte for byte against llama.cpp's conversion path), no importance matrix;
- llama.cpp + imatrix: the same with ``--imatrix``, computed by ``llama-imatrix`` on the text of
  the same calibration windows llmquant uses (its time is reported once, on its own row);
- llmquant: ``python -m llmquant.run recipes/llama_w4_gguf.yaml`` with that mix: AWQ scale and
  clip search under each tensor's GGML type and importance-weighted block fitting.
Every file is then scored by ``llama-perplexity`` on the same held-out text (the decoded
evaluation windows, disjoint from the calibration documents), with KL divergence against the
F32 file's logits. The table goes to eval/results/gguf_bench.{md,json} and is printed.

    nice -n 10 python eval/bench_gguf.py [--types Q4_0 Q4_K_M Q3_K_M] [--quick] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: llmquant is the package here
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

from llmquant.cache import cache_root  # noqa: E402
from llmquant.evaluate import llamacpp_tools  # noqa: E402
from llmquant.export.gguf.writer import write_gguf  # noqa: E402
from llmquant.model.source import resolve_model  # noqa: E402
from llmquant.pipeline import load_windows  # noqa: E402
from llmquant.recipe import load_recipe  # noqa: E402
from llmquant.tensors import SafetensorsFolder  # noqa: E402

log = logging.getLogger("bench_gguf")

RESULTS = REPO / "eval" / "results"
RECIPE = "recipes/llama_w4_gguf.yaml"
METHODS = ("llama.cpp", "llama.cpp + imatrix", "llmquant")
QUICK_SET = [
    "calibration.n_samples=4", "calibration.seq_len=128", "awq.n_grid=4", "awq.clip_n_grid=4",
]  # fmt: skip

# llama-perplexity's summary lines (tools/perplexity/perplexity.cpp).
PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)\s*±\s*([0-9.]+)",
    "kld": r"Mean\s+KLD:\s*([0-9.e+-]+)\s*±\s*([0-9.e+-]+)",
    "kld_median": r"Median\s+KLD:\s*([0-9.e+-]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([0-9.e+-]+)",
    "top1": r"Same top p:\s*([0-9.]+)\s*±\s*([0-9.]+)\s*%",
}


def parse_kld_output(text: str) -> dict:
    """PPL, KLD (mean, median, 99th percentile) and top-1 agreement from llama-perplexity."""
    out = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"llama-perplexity output has no {key!r} line:\n{text[-3000:]}")
        out[key] = float(m.group(1))
        if m.lastindex and m.lastindex > 1:
            out[key + "_se"] = float(m.group(2))
    out["top1"] /= 100.0
    out["top1_se"] /= 100.0
    return out


def file_stats(path: Path) -> dict:
    """Size, bits per weight over all tensors, and the tensor type counts of a GGUF file."""
    reader = gguf.GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elements = sum(int(np.prod(t.shape)) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(t.tensor_type).name
        types[name] = types.get(name, 0) + 1
    return {
        "file_bytes": path.stat().st_size,
        "bpw": 8 * n_bytes / n_elements,
        "types": dict(sorted(types.items())),
    }


def perplexity_cmd(tools, model: Path, threads: int, *extra: str) -> list[str]:
    return [str(tools.tool("llama-perplexity")), "-m", str(model), "-t", str(threads), *extra]


def score(tools, model: Path, base_kld: Path, threads: int, log_path: Path) -> dict:
    cmd = perplexity_cmd(tools, model, threads, "--kl-divergence-base", str(base_kld),
                         "--kl-divergence")  # fmt: skip
    measured = run_measured(cmd, log_path)
    return {**parse_kld_output(log_path.read_text()), "eval_s": measured["wall_s"]}


def run_gguf_recipe(
    out: Path, sets: list[str], overrides: list[str], log_path: Path, resume: bool = False
) -> tuple[dict, dict]:
    """The GGUF recipe into ``out`` with ``sets``, evaluation off, then ``overrides``."""
    items = [*sets, "evaluation.enabled=false", *overrides]
    return run_recipe(RECIPE, out, items, log_path, resume)


def llmquant_gguf(mix: str, overrides: list[str], work: Path) -> dict:
    """``python -m llmquant.run`` of the GGUF recipe with ``mix``: its file and measured run."""
    sets = [f"quant.gguf_mix={mix}", f"export=[{{kind: gguf, types: [{mix}]}}]"]
    measured, report = run_gguf_recipe(
        work / f"llmquant_{mix}", sets, overrides, work / f"llmquant_{mix}.log"
    )
    (path,) = report["outputs"].values()
    return {**measured, "path": path, "timings": report["timings"]}


def llama_quantize(tools, f32: Path, mix: str, imatrix: Path | None, work: Path) -> dict:
    stem = f"llamacpp_{mix}" + ("_imatrix" if imatrix else "")
    out = work / f"{stem}.gguf"
    cmd = [str(tools.tool("llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(f32), str(out), mix, "2"]
    return {**run_measured(cmd, work / f"{stem}.log"), "path": str(out)}


def window_text(tokenizer, windows: torch.Tensor) -> str:
    """The text of token windows cut from one stream ([n, seq_len]), as llama.cpp's tools read
    it: a leading BOS (Gemma's windows start with one) is dropped, since llama-imatrix and
    llama-perplexity put BOS at the start of every chunk themselves."""
    bos = tokenizer.bos_token_id
    if bos is not None and bool((windows[:, 0] == bos).all()):
        windows = windows[:, 1:]  # [n, seq_len - 1]
    # The windows are slices of one token stream, so their decoded text is that stream's text.
    return tokenizer.decode(windows.flatten().tolist())


@dataclass
class Base:
    """What every quantized file of one model is made from and scored against."""

    model_dir: Path
    calib: torch.Tensor  # [n_cal, seq_len] token ids
    windows: torch.Tensor  # [n_eval, ctx] token ids
    f32: Path
    f32_digest: str
    imatrix: Path
    imx: dict  # the llama-imatrix step (run_measured, command_short)
    base_kld: Path
    f32_doc: dict  # the F32 file's PPL and file_stats
    chunks: int  # chunks llama-perplexity scored


def prepare_base(
    tools,
    work: Path,
    overrides: list[str],
    eval_windows: int,
    ctx: int,
    threads: int,
    reuse: bool,
) -> Base:
    """The recipe's model and windows, the F32 GGUF, llama-imatrix over the calibration text
    and the F32 logits (KLD base) over the evaluation text, each step cached under ``work``."""
    recipe = load_recipe(REPO / RECIPE, [
        *overrides, f"evaluation.n_windows={eval_windows}", f"evaluation.seq_len={ctx}",
    ])  # fmt: skip
    model_dir = resolve_model(recipe.model.source, recipe.model.revision, recipe.model.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib, windows = load_windows(recipe, model_dir, tokenizer)
    calib_txt, eval_txt = work / "calibration.txt", work / "evaluation.txt"
    calib_txt.write_text(window_text(tokenizer, calib))
    eval_txt.write_text(window_text(tokenizer, windows))

    f32 = work / "f32.gguf"
    if not (reuse and f32.is_file()):
        write_gguf(model_dir, SafetensorsFolder(model_dir), f32, "F32")

    imatrix = work / "imatrix.gguf"
    n_cal, seq = calib.shape

    def make_imatrix() -> dict:
        cmd = [
            str(tools.tool("llama-imatrix")), "-m", str(f32), "-f", str(calib_txt),
            "-c", str(seq), "--chunks", str(n_cal), "-o", str(imatrix), "--no-ppl",
            "-t", str(threads),
        ]  # fmt: skip
        return run_measured(cmd, work / "imatrix.log")

    f32_digest = digest(f32)
    imx = cached_step(
        work / "imatrix.json", reuse and imatrix.is_file(), make_imatrix,
        key={"f32": f32_digest, "calibration": digest(calib), "threads": threads},
    )  # fmt: skip
    imx["command_short"] = f"-c {seq} --chunks {n_cal}"

    base_kld = work / "f32.kld"

    def score_base() -> dict:
        cmd = perplexity_cmd(tools, f32, threads, "-f", str(eval_txt), "-c", str(ctx),
                             "--chunks", str(eval_windows), "--kl-divergence-base",
                             str(base_kld))  # fmt: skip
        log_path = work / "f32_ppl.log"
        run_measured(cmd, log_path)
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log_path.read_text())
        return {"ppl": float(m.group(1)), "ppl_se": float(m.group(2)), **file_stats(f32)}

    f32_doc = cached_step(
        work / "f32.json", reuse and base_kld.is_file(), score_base,
        key={"f32": f32_digest, "evaluation": digest(windows), "ctx": ctx,
             "chunks": eval_windows},
    )  # fmt: skip
    chunks = int(re.findall(r"calculating perplexity over (\d+) chunks",
                            (work / "f32_ppl.log").read_text())[-1])  # fmt: skip
    return Base(model_dir, calib, windows, f32, f32_digest, imatrix, imx, base_kld, f32_doc,
                chunks)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q3_K_M"])
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows (x ctx)")
    parser.add_argument("--ctx", type=int, default=512, help="llama-perplexity context")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument(
        "--torch-threads", type=int, help="torch threads of the llmquant runs (recipe `threads`)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS,
        help="which files to make and score (the table lists what was scored)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny smoke test settings")
    parser.add_argument("--work", type=Path, default=cache_root() / "bench_gguf")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--reuse", action="store_true", help="reuse finished steps in --work")
    args = parser.parse_args(argv)
    if args.quick:
        args.eval_windows, args.ctx = min(args.eval_windows, 4), min(args.ctx, 128)
        args.work = args.work.with_name(args.work.name + "_quick")
        args.results = args.work  # a smoke test never overwrites the committed results
    return args


def with_imatrix_wall(row: dict, doc: dict) -> float | None:
    """What the row's file cost in wall seconds, counting llama-imatrix for the imatrix rows."""
    if row["method"] == "llama.cpp + imatrix":
        return row["wall_s"] + doc["imatrix"]["wall_s"]
    return row["wall_s"] if row["method"] == "llmquant" else None


def comparisons(doc: dict) -> list[str]:
    """Per type: llmquant's wall time over llama-imatrix + llama-quantize, and its KLD against
    the imatrix file's, with whether the difference is inside the +-1 se bars."""
    lines = []
    for mix in dict.fromkeys(row["type"] for row in doc["rows"]):
        rows = {row["method"]: row for row in doc["rows"] if row["type"] == mix}
        ours, theirs = rows.get("llmquant"), rows.get("llama.cpp + imatrix")
        if ours is None or theirs is None:
            continue
        ratio = with_imatrix_wall(ours, doc) / with_imatrix_wall(theirs, doc)
        lines.append(
            f"- {mix}: llmquant wall {ours['wall_s']:.0f} s = {ratio:.2f} x llama-imatrix + "
            f"llama-quantize ({with_imatrix_wall(theirs, doc):.0f} s); CPU {ours['cpu_s']:.0f} s "
            f"vs {theirs['cpu_s'] + doc['imatrix']['cpu_s']:.0f} s; mean KLD {ours['kld']:.4f} "
            f"vs {theirs['kld']:.4f} ({se_bars(ours, theirs, 'kld')} the +-1 se bars)"
        )
    return lines


def render(doc: dict) -> str:
    base = doc["f32"]
    lines = [
        "| type | method | bpw | size | PPL ± se | PPL / F32 | KLD mean | KLD median | KLD p99 "
        "| top-1 | quantize wall | wall with imatrix | CPU s with imatrix |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| F32 | - | 32.00 | {base['file_bytes'] / 2**20:.1f} MiB | {base['ppl']:.3f} ± "
        f"{base['ppl_se']:.3f} | 1.000 | 0 | 0 | 0 | 1.000 | - | - | - |",
    ]
    for row in doc["rows"]:
        total = with_imatrix_wall(row, doc)
        imx_cpu = doc["imatrix"]["cpu_s"] if row["method"] == "llama.cpp + imatrix" else 0.0
        wall = "-" if total is None else f"{total:.0f} s"
        cpu = "-" if total is None else f"{row['cpu_s'] + imx_cpu:.0f} s"
        lines.append(
            f"| {row['type']} | {row['method']} | {row['bpw']:.2f} | "
            f"{row['file_bytes'] / 2**20:.1f} MiB | {row['ppl']:.3f} ± {row['ppl_se']:.3f} | "
            f"{row['ppl'] / base['ppl']:.3f} | {row['kld']:.4f} ± {row['kld_se']:.4f} | "
            f"{row['kld_median']:.4f} | {row['kld_p99']:.4f} | {row['top1']:.3f} | "
            f"{row['wall_s']:.0f} s | {wall} | {cpu} |"
        )
    return "\n".join([*lines, "", *comparisons(doc)])


def markdown(doc: dict) -> str:
    vers = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    ev, cal, imx = doc["evaluation"], doc["calibration"], doc["imatrix"]
    return "\n".join(
        [
            "# GGUF benchmark: llmquant vs llama-quantize (without and with an imatrix)",
            "",
            f"- date: {doc['date']}",
            f"- command: `{doc['command']}`",
            f"- machine: {doc['machine']}",
            f"- llmquant code: {doc['git']}; {vers}; llama.cpp from llama-cpp-python "
            f"{llamacpp_tools.VERSION}",
            f"- model: {doc['model_dir']} (SmolLM2-135M-Instruct, fp32 dequantized from its "
            "Q4_1 GGUF); F32 GGUF written by llmquant",
            f"- calibration: {cal['windows']} x {cal['seq_len']} tokens of the default Wikipedia "
            f"text; llama-imatrix on the same text ({imx['command_short']}, {imx['wall_s']:.0f} s)",
            f"- evaluation: llama-perplexity, {ev['chunks']} chunks x {ev['ctx']} tokens of the "
            "held-out documents (it scores the second half of each chunk), KL divergence against "
            "the F32 file's logits on the same tokens",
            "- quantize wall: the quantizing process alone (`wait4`); for llmquant it includes "
            "model load, calibration forward passes, AWQ and clip search, and writing the file; "
            "'with imatrix' adds llama-imatrix's wall and CPU seconds to llama-quantize's "
            "(llmquant needs no separate statistics run, so its row is its own run); all "
            "measured in this invocation unless the runs list says a step was reused",
            "",
            render(doc),
            "",
            "Steps made by (llama-imatrix and each file):",
            *made_by_lines([imx, *doc["rows"]]),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    overrides = QUICK_SET if args.quick else []
    if args.torch_threads:
        overrides = [*overrides, f"threads={args.torch_threads}"]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tools = llamacpp_tools.locate()

    base = prepare_base(tools, work, overrides, args.eval_windows, args.ctx, args.threads,
                        args.reuse)  # fmt: skip
    f32, imatrix, f32_digest, imx = base.f32, base.imatrix, base.f32_digest, base.imx
    base_kld, f32_doc, chunks = base.base_kld, base.f32_doc, base.chunks
    n_cal, seq = base.calib.shape

    rows = []
    for mix in args.types:
        made = {
            "llama.cpp": lambda m=mix: llama_quantize(tools, f32, m, None, work),
            "llama.cpp + imatrix": lambda m=mix: llama_quantize(tools, f32, m, imatrix, work),
            "llmquant": lambda m=mix: llmquant_gguf(m, overrides, work),
        }
        for method, make in made.items():
            if method not in args.methods:
                continue
            stem = f"{method.replace(' + ', '_').replace('.', '')}_{mix}"
            step = cached_step(
                work / f"{stem}.json", args.reuse, make,
                key={"method": method, "mix": mix, "f32": f32_digest, "imatrix": digest(imx),
                     "overrides": overrides},
            )  # fmt: skip
            path = Path(step["path"])
            scored = cached_step(
                work / f"{stem}_score.json", args.reuse, score, tools, path, base_kld,
                args.threads, work / f"{stem}_score.log",
                key={"file": digest(step), "base": digest(f32_doc)},
            )  # fmt: skip
            rows.append({
                "type": mix, "method": method, **file_stats(path), **scored,
                "wall_s": step["wall_s"], "cpu_s": step["cpu_s"],
                "peak_rss_bytes": step["peak_rss_bytes"], "command": step["command"],
                "made_by": step.get("made_by"),
            })  # fmt: skip

    doc = {
        **result_header(command, args.quick, base.model_dir),
        "calibration": {"windows": n_cal, "seq_len": seq},
        "evaluation": {"chunks": chunks, "ctx": args.ctx, "text_tokens": int(base.windows.numel())},
        "imatrix": imx,
        "f32": f32_doc,
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gguf_bench.json").write_text(json.dumps(doc, indent=2))
    (args.results / "gguf_bench.md").write_text(markdown(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
