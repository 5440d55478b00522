"""Scale benchmark: real shapes (random weights) in bfloat16, memory bounded by one block.

Every figure here is measured on synthetic checkpoints (``tools/make_synthetic_model.py``):
**random weights, shapes of a named model** — good for memory and time, never for quality.

CPU part (this machine):
- the Llama-2-7B shape in bfloat16, int4 g128 with zero point, 16 x 512 calibration tokens,
  writing all three exports (AutoAWQ GEMM, compressed-tensors, GGUF Q8_0): round-to-nearest on
  ``--rtn-layers`` blocks and AWQ on ``--awq-layers`` blocks (a config truncated to that many
  layers: what one block costs does not depend on how many follow); peak RSS against the whole
  model's size, seconds per block, and the extrapolation to all 32 blocks and to 128 x 512;
- the Llama-3-70B shape with ``--big-layers`` counts of blocks (RTN, no export): peak RSS must
  not grow with depth.
The GPU part is ``eval/gpu_scale.sh`` (one short script for a lent GPU machine).

    python eval/bench_scale.py                 # CPU part; eval/results/scale_bench.{md,json}
    python eval/bench_scale.py --quick         # smoke test: tiny shape, seconds
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
from bench_common import cached_step, made_by_lines, result_header, run_measured  # noqa: E402

log = logging.getLogger("bench_scale")
RESULTS = REPO / "eval" / "results"
WORK = Path.home() / ".cache" / "llmquant" / "bench_scale"
TOOL = REPO / "tools" / "make_synthetic_model.py"
EXPORTS = "[{kind: awq-gemm}, {kind: compressed-tensors}, {kind: gguf, types: [Q8_0]}]"


def synthetic(work: Path, shape: str, layers: int, reuse: bool) -> Path:
    out = work / f"{shape}-{layers}l"
    if not (reuse and (out / "config.json").is_file()):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, str(TOOL), "--shape", shape, "--dtype", "bfloat16",
               "--layers", str(layers), str(out)]  # fmt: skip
        run_measured(cmd, work / f"make-{shape}-{layers}l.log")
    return out


def step_key(args, model: Path, sets: list[str]) -> dict:
    """What a quantize step's figures depend on besides the code: the synthetic model (its
    shape and depth, in its name) and every setting."""
    return {"model": model.name, "sets": sets, "threads": args.threads}


def quantize(args, model: Path, name: str, sets: list[str]) -> dict:
    out = args.work / name
    cmd = [
        sys.executable, "-m", "llmquant.run", "recipes/llama_w4.yaml", "--out", str(out),
        "--set", f"model.source={model}", "--set", "evaluation.enabled=false",
        "--set", "quant.group_size=128", "--set", f"threads={args.threads}",
        *[item for s in sets for item in ("--set", s)],
    ]  # fmt: skip
    step = run_measured(cmd, args.work / f"{name}.log")
    report = json.loads((out / "report.json").read_text())
    seconds = [b["seconds"] for b in report["blocks"]]
    config = json.loads((model / "config.json").read_text())
    step.update(
        {
            "blocks": len(seconds),
            "seconds_per_block": seconds,
            "mean_block_s": sum(seconds) / len(seconds),
            "timings": report["timings"],
            "sizes": report["sizes"],
            "runtime": report["runtime"],
            "peak_rss_report": report["peak_rss_bytes"],
            "model_layers": config["num_hidden_layers"],
            "calibration": f"{report['eval']['calibration_windows']} x "
            f"{report['eval']['calibration_seq_len']}",
            # False: round-to-nearest whose outputs read no statistics skips the block passes.
            "calibration_used": report["eval"].get("calibration_used", True),
        }
    )
    return step


class _Skeleton:
    """What ``predicted_peak_rss`` reads of a streamed model, from a meta skeleton (no weights),
    so every committed row is predicted by the same (current) memory model."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        layers = model.model.layers
        self.blocks = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        self.total = sum(p.numel() for p in model.parameters())
        self.largest = max(p.numel() for p in model.parameters())
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def block_numel(self, i: int = 0) -> int:
        return self.blocks[i]

    def non_block_numel(self) -> int:
        return self.total - sum(self.blocks)


def predicted_now(model: Path, row: dict, exports: bool) -> int:
    """The current memory model's prediction for a finished row (bfloat16 weights)."""
    import torch

    from llmquant.model.device import predicted_peak_rss

    skeleton = _Skeleton(model)
    config = json.loads((model / "config.json").read_text())
    n, seq = (int(v) for v in row["calibration"].split(" x "))
    streams = n * seq * config["hidden_size"] * 4
    writer = 0
    if exports:  # the GGUF export's float32 tensor and its bytes; the 2 GB safetensors shard
        writer = max(8 * skeleton.largest, min(2 * 2**30, 2 * skeleton.total))
    return predicted_peak_rss(skeleton, torch.bfloat16, streams, writer)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def measured_row(args, model: Path, name: str, sets: list[str], exports: bool) -> dict:
    """One quantize step (reused when its key and the code match) with today's prediction."""
    row = cached_step(
        args.work / f"{name}.json", args.reuse, quantize, args, model, name, sets,
        key=step_key(args, model, sets),
    )  # fmt: skip
    row["predicted_now"] = predicted_now(model, row, exports=exports)
    return row


def cpu_part(args) -> dict:
    shape = "llama-tiny" if args.quick else args.shape
    cal = ["calibration.n_samples=2", "calibration.seq_len=64", "quant.group_size=32"] if (
        args.quick
    ) else [
        f"calibration.n_samples={args.n_samples}", "calibration.seq_len=512",
    ]  # fmt: skip
    quick_awq = ["awq.n_grid=3", "awq.clip_n_grid=3"] if args.quick else []
    rtn = [*cal, "awq.enabled=false"]
    rows = {}
    model = synthetic(args.work, shape, args.rtn_layers, args.reuse)
    rows["rtn"] = measured_row(args, model, "rtn", [*rtn, f"export={EXPORTS}"], exports=True)
    model = synthetic(args.work, shape, args.awq_layers, args.reuse)
    awq = [*cal, *quick_awq, f"export={EXPORTS}"]
    rows["awq"] = measured_row(args, model, "awq", awq, exports=True)
    if args.full_rtn:
        layers = full_model(shape)["layers"]
        model = synthetic(args.work, shape, layers, args.reuse)
        rows["rtn_full"] = measured_row(
            args, model, "rtn_full", [*rtn, f"export={EXPORTS}"], exports=True
        )
        if not args.keep:  # 13.5 GB of random weights and 33 GB of outputs; the config stays
            import shutil

            for weights in model.glob("*.safetensors"):
                weights.unlink()
            shutil.rmtree(args.work / "rtn_full")
    big = "llama-tiny" if args.quick else args.big_shape
    rows["depth"] = {}
    for layers in args.big_layers:
        model = synthetic(args.work, big, layers, args.reuse)
        rows["depth"][layers] = measured_row(
            args, model, f"depth{layers}", [*rtn, "export=[]"], exports=False
        )
    return {"shape": shape, "big_shape": big, "rows": rows}


def full_model(shape: str) -> dict:
    """Layers, parameters and bfloat16 / float32 bytes of the whole named model."""
    sys.path.insert(0, str(REPO / "tools"))
    import make_synthetic_model as tool

    config = tool.build_config(shape, "bfloat16")
    params = sum(spec.numel for spec in tool.tensor_specs(config))
    return {
        "layers": config.num_hidden_layers,
        "params": params,
        "bf16_bytes": 2 * params,
        "fp32_bytes": 4 * params,
    }


def markdown(doc: dict) -> str:
    rows, shape = doc["cpu"]["rows"], doc["cpu"]["shape"]
    full = doc["cpu"].get("full_model", {})
    lines = [
        "# Scale benchmark: real shapes, random weights",
        "",
        f"Command: `{doc['header']['command']}` ({doc['header']['date']}, "
        f"{doc['header']['machine']}, git {doc['header']['git']}).",
        "",
        f"**Random weights, shapes of {shape}**: good for memory and time, never for quality. "
        "Wall times are on a shared 2-core machine (CPU seconds are the steadier figure).",
        "",
        "| run | blocks run | calibration | s / block | wall s | CPU s | peak RSS GiB |"
        " predicted GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("rtn", "awq", "rtn_full"):
        if key not in rows:
            continue
        r = rows[key]
        label = {"rtn": "RTN", "awq": "AWQ", "rtn_full": "RTN, every block"}[key]
        calibration = r["calibration"] + ("" if r.get("calibration_used", True) else " (not read)")
        lines.append(
            f"| {label}, int4 g128 asym, 3 exports | {r['blocks']} | {calibration} | "
            f"{r['mean_block_s']:.1f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{gib(r['peak_rss_bytes'])} | {gib(r['predicted_now'])} |"
        )
    if full:
        lines += [
            "",
            f"Whole {shape}: {full['params'] / 1e9:.2f} B parameters, "
            f"{gib(full['bf16_bytes'])} GiB in bfloat16, {gib(full['fp32_bytes'])} GiB in float32.",
        ]
        n_layers = full.get("layers")
        if n_layers:
            for key in ("rtn", "awq"):
                r = rows[key]
                per = r["mean_block_s"]
                if not r.get("calibration_used", True):
                    lines.append(
                        f"- {key.upper()}: {per:.1f} s per block -> {per * n_layers / 60:.0f} min "
                        f"for {n_layers} blocks; it reads no calibration, so 128 x 512 costs "
                        "the same."
                    )
                    continue
                lines.append(
                    f"- {key.upper()}: {per:.1f} s per block -> {per * n_layers / 60:.0f} min for "
                    f"{n_layers} blocks at {r['calibration']}; the block passes grow linearly "
                    f"with tokens, so 128 x 512 is about {per * n_layers * 8 / 3600:.1f} h "
                    "(upper bound: the scale search uses at most search_n_tokens)."
                )
    made = [*(rows[k] for k in ("rtn", "awq", "rtn_full") if k in rows), *rows["depth"].values()]
    lines += ["", "Rows made by:", *made_by_lines(made)]
    lines += ["", f"Memory against depth ({doc['cpu']['big_shape']}, RTN, no export):", ""]
    lines += ["| layers | peak RSS GiB | predicted GiB | s / block |", "|---|---|---|---|"]
    for layers, r in sorted(rows["depth"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {layers} | {gib(r['peak_rss_bytes'])} | {gib(r['predicted_now'])} | "
            f"{r['mean_block_s']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--shape", default="llama-2-7b")
    parser.add_argument("--rtn-layers", type=int, default=4)
    parser.add_argument("--awq-layers", type=int, default=1)
    parser.add_argument("--big-shape", default="llama-3-70b")
    parser.add_argument("--big-layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-rtn", action="store_true", help="also RTN on every block")
    parser.add_argument("--keep", action="store_true", help="keep the full-depth model")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse finished steps in --work")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "eval/bench_scale.py", *(argv or sys.argv[1:])])
    doc = {"header": result_header(command, args.quick, args.work), "cpu": cpu_part(args)}
    if not args.quick:
        doc["cpu"]["full_model"] = full_model(args.shape)
    out = args.out if not args.quick else args.work / "quick"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(doc, indent=2))
    Path(f"{out}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
