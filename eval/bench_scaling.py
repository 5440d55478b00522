"""Scaling table: seconds per block against layer width and calibration tokens (issue 13).

``recipes/llama_w4.yaml`` (int4 g64, AWQ scale and clip search; evaluation and exports off) on
two widths, each cut to ``--layers`` blocks (what one block costs does not depend on how many
follow):
- the default model (SmolLM2-135M: hidden 576, MLP 1536), its real weights;
- a synthetic wider shape (``tools/make_synthetic_model.py --shape llama-3.2-1b``: hidden 2048,
  MLP 8192, bfloat16 random weights, good for time, never for quality);
at each of ``--samples`` calibration sizes (x 512 tokens). Per run: block-loop seconds per block
and its parts (statistics pass, propagation pass, scale search, clip search), CPU seconds, and
the ratios that say whether cost grows linearly: against the smallest calibration, and the wide
shape against the default one next to their ratio of multiply-adds per token.

    python eval/bench_scaling.py            # eval/results/scaling_bench.{md,json}
    python eval/bench_scaling.py --quick    # 2 tiny sizes, under ~/.cache/llmquant
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: llmquant is the package here
sys.path.insert(0, str(REPO / "eval"))
from bench_common import cached_step, made_by_lines, result_header, run_recipe  # noqa: E402
from bench_scale import synthetic  # noqa: E402
from profile_run import truncated_default_model  # noqa: E402

from llmquant.cache import cache_root  # noqa: E402

log = logging.getLogger("bench_scaling")
RESULTS = REPO / "eval" / "results"
PARTS = ("statistics pass", "propagation pass", "scale search", "clip search")


def block_macs(config: dict) -> int:
    """Multiply-adds per token of one block's linears (attention scores left out)."""
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads")
    kv_width = hidden // heads * (kv or heads)
    return 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * mlp


def quantize(args, model: Path, n_samples: int) -> dict:
    out = args.work / f"{model.name}-n{n_samples}"
    sets = [f"model.source={model}", "evaluation.enabled=false", "export=[]",
            f"threads={args.threads}", f"calibration.n_samples={n_samples}",
            f"calibration.seq_len={args.seq}"]  # fmt: skip
    step, report = run_recipe("recipes/llama_w4.yaml", out, sets, args.work / f"{out.name}.log")
    n_blocks = len(report["blocks"])
    return {
        **step,
        "blocks": n_blocks,
        "block_loop_s": report["timings"]["quantize"],
        "parts_s": {part: report["profile"].get(part, 0.0) for part in PARTS},
        "awq": report["recipe"]["awq"],
    }


def part_per_block(row: dict, part: str) -> float:
    """Seconds of ``part`` per block that runs it (the last block propagates nothing)."""
    runs = row["blocks"] - 1 if part == "propagation pass" else row["blocks"]
    return row["parts_s"][part] / max(runs, 1)


def render(doc: dict) -> list[str]:
    lines = [
        "| model (hidden, MLP) | calibration | s / block | x smallest | statistics pass | "
        "propagation pass | scale search | clip search | CPU s (run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in doc["models"]:
        rows = model["rows"]
        first = rows[0]["block_loop_s"] / rows[0]["blocks"]
        for row in rows:
            per = row["block_loop_s"] / row["blocks"]
            parts = " | ".join(f"{part_per_block(row, p):.1f}" for p in PARTS)
            lines.append(
                f"| {model['label']} ({model['hidden']}, {model['mlp']}) | {row['n_samples']} x "
                f"{doc['seq']} | {per:.1f} | {per / first:.2f} | {parts} | {row['cpu_s']:.0f} |"
            )
    if len(doc["models"]) == 2:
        small, wide = doc["models"]
        lines += ["", f"Wide over default, multiply-adds per token of a block: "
                  f"{wide['macs'] / small['macs']:.1f} x; measured seconds per block:"]  # fmt: skip
        for a, b in zip(small["rows"], wide["rows"]):
            ratio = (b["block_loop_s"] / b["blocks"]) / (a["block_loop_s"] / a["blocks"])
            lines.append(f"- {a['n_samples']} x {doc['seq']}: {ratio:.1f} x")
    return lines


def markdown(doc: dict) -> str:
    awq = doc["models"][0]["rows"][0]["awq"]
    parts = [
        "# Scaling: seconds per block against width and calibration tokens",
        "",
        f"Command: `{doc['header']['command']}` ({doc['header']['date']}, "
        f"{doc['header']['machine']}, git {doc['header']['git']}).",
        "",
        f"`recipes/llama_w4.yaml`, evaluation and exports off, threads={doc['threads']}, each "
        f"model cut to {doc['layers']} blocks; seconds per block = the block loop over its blocks "
        "(the last block runs no propagation pass, so its column is per block that runs one); "
        "the parts columns are seconds per block. The scale "
        f"search reads at most search_n_tokens={awq['search_n_tokens']} tokens and the clip "
        f"search clip_n_tokens={awq['clip_n_tokens']}, so only the passes grow with calibration.",
        "",
        *render(doc),
        "",
        "Runs made by:",
        *made_by_lines([row for model in doc["models"] for row in model["rows"]]),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--wide-shape", default="llama-3.2-1b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse finished steps in --work")
    parser.add_argument("--work", type=Path, default=cache_root() / "bench_scaling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.quick:
        args.samples, args.seq = [2, 4], 128
        args.work = args.work.with_name(args.work.name + "_quick")
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "eval/bench_scaling.py", *(argv or sys.argv[1:])])

    models = [("default", truncated_default_model(args.work, args.layers))]
    models.append((args.wide_shape, synthetic(args.work, args.wide_shape, args.layers, True)))
    doc = {
        "header": result_header(command, args.quick, args.work),
        "seq": args.seq,
        "layers": args.layers,
        "threads": args.threads,
        "models": [],
    }
    for label, folder in models:
        config = json.loads((folder / "config.json").read_text())
        rows = []
        for n in args.samples:
            row = cached_step(
                args.work / f"{folder.name}-n{n}.json", args.reuse, quantize, args, folder, n,
                key={"model": folder.name, "n": n, "seq": args.seq, "threads": args.threads},
            )  # fmt: skip
            rows.append({**row, "n_samples": n})
        doc["models"].append({
            "label": label, "folder": str(folder), "hidden": config["hidden_size"],
            "mlp": config["intermediate_size"], "macs": block_macs(config), "rows": rows,
        })  # fmt: skip
    out = RESULTS / "scaling_bench" if not args.quick else args.work / "scaling_bench"
    Path(f"{out}.json").write_text(json.dumps(doc, indent=2))
    Path(f"{out}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
