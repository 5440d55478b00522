"""Profile a run: seconds per step and per block part, CPU seconds, for one or two code versions.

Runs ``python -m llmquant.run RECIPE`` for each recipe given, with the current tree and, with
``--before REF``, with the code of git ``REF`` (checked out into a worktree under ``--work``),
one after the other on the same model, text, calibration and threads. Each run's figures come
from its report.json (``timings``: seconds per step; ``profile``: seconds of the block loop by
part) and from the child's rusage (wall, CPU seconds, peak RSS). ``--layers N`` runs a copy of
the default model cut to its first N blocks: a block costs the same whatever follows it, so the
block loop's seconds scale to the full depth (the table gives both). The table also compares the
two versions' choices: the α of every scale group and the final perplexities.

    python eval/profile_run.py recipes/llama_w4.yaml --before 8c95f49 --layers 6
    python eval/profile_run.py --quick recipes/llama_w4.yaml      # smoke test, tiny settings
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: llmquant is the package here
sys.path.insert(0, str(REPO / "eval"))
from bench_common import cached_step, digest, result_header, run_measured  # noqa: E402

log = logging.getLogger("profile_run")
RESULTS = REPO / "eval" / "results"
WORK = Path.home() / ".cache" / "llmquant" / "profile_run"
QUICK_SETS = ["calibration.n_samples=4", "calibration.seq_len=128", "evaluation.n_windows=2",
              "evaluation.seq_len=128", "awq.n_grid=4", "awq.clip_n_grid=4"]  # fmt: skip


def truncated_default_model(work: Path, layers: int) -> Path:
    """The default model cut to its first ``layers`` blocks (config, tokenizer, tensors)."""
    import safetensors.torch

    from llmquant.model.source import resolve_model

    source = resolve_model("default", None, None)
    out = work / f"default-{layers}l"
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    total = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):  # fmt: skip
        if (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())
    tensors = safetensors.torch.load_file(source / "model.safetensors")
    kept = {
        name: t
        for name, t in tensors.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers
    }
    safetensors.torch.save_file(kept, out / "model.safetensors.tmp", metadata={"format": "pt"})
    (out / "model.safetensors.tmp").rename(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "full_depth.json").write_text(json.dumps({"num_hidden_layers": total}))
    return out


def code_at(ref: str, work: Path) -> tuple[Path, str]:
    """A worktree of ``ref`` under ``work`` and its full commit hash."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    tree = work / f"code-{commit[:10]}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO,
                       check=True, capture_output=True)  # fmt: skip
    return tree, commit


def run_recipe(code: Path, recipe: Path, out: Path, sets: list[str], log_path: Path) -> dict:
    cmd = [sys.executable, "-m", "llmquant.run", str(recipe.resolve()), "--out", str(out),
           *[item for s in sets for item in ("--set", s)]]  # fmt: skip
    # The command runs in ``code``: `python -m` imports the llmquant package found there.
    step = run_measured(cmd, log_path, cwd=code)
    report = json.loads((out / "report.json").read_text())
    step.update(
        {
            "timings": report["timings"],
            "profile": report.get("profile", {}),
            "ppl": report["ppl"],
            "ppl_se": {k: v.get("ppl_se") for k, v in report.get("ppl_detail", {}).items()},
            "blocks": len(report["blocks"]),
            "alphas": [
                {group: g["alpha"] for group, g in b.get("groups", {}).items()}
                for b in report["blocks"]
            ],
        }
    )
    return step


def markdown(doc: dict) -> str:
    lines = [f"# Run profile: {', '.join(doc['recipes'])}", "",
             f"Command: `{doc['command']}` ({doc['date']}, {doc['machine']}, git {doc['git']}).",
             ""]  # fmt: skip
    scale = doc["full_depth"] / doc["layers"] if doc["layers"] else 1.0
    for recipe, rows in doc["runs"].items():
        names = list(rows)
        lines += [f"## {recipe}", "", f"Settings: `{' '.join(doc['sets']) or 'as written'}`"
                  + (f"; the default model cut to {doc['layers']} of its {doc['full_depth']} "
                     f"blocks, block-loop seconds also scaled x{scale:.0f} to full depth"
                     if doc["layers"] else "") + ".", ""]  # fmt: skip
        lines += ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

        def row(label: str, fmt, rows=rows, names=names, lines=lines) -> None:
            lines.append(f"| {label} | " + " | ".join(fmt(rows[n]) for n in names) + " |")

        row("wall s", lambda r: f"{r['wall_s']:.0f}")
        row("CPU s", lambda r: f"{r['cpu_s']:.0f}")
        row("peak RSS GiB", lambda r: f"{r['peak_rss_bytes'] / 2**30:.2f}")
        steps = sorted({k for r in rows.values() for k in r["timings"]})
        for step in steps:
            row(f"step: {step} s", lambda r, s=step: f"{r['timings'].get(s, 0):.1f}")
        parts = sorted(
            {k for r in rows.values() for k in r["profile"]},
            key=lambda k: -max(r["profile"].get(k, 0) for r in rows.values()),
        )
        for part in parts:
            row(f"block loop: {part} s", lambda r, p=part: f"{r['profile'].get(p, 0):.1f}")
        if doc["layers"]:
            row(f"block loop at {doc['full_depth']} blocks s (scaled)",
                lambda r: f"{r['timings']['quantize'] * scale:.0f}")  # fmt: skip
        for key in sorted({k for r in rows.values() for k in r["ppl"]}):
            row(f"PPL {key}", lambda r, k=key: f"{r['ppl'][k]:.4f} ± {r['ppl_se'].get(k) or 0:.3f}")
        if len(names) == 2:
            a, b = (rows[n]["alphas"] for n in names)
            pairs = [(x.get(g), y.get(g)) for xa, ya in zip(a, b) for x, y in [(xa, ya)]
                     for g in x]  # fmt: skip
            same = sum(1 for x, y in pairs if x == y)
            lines += ["", f"Scale groups with the same α in both: {same} of {len(pairs)}."]
        lines.append("")
    lines += ["Runs made by:"] + [f"- `{c}`" for c in doc["invocations"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--before", help="git ref whose code runs the same recipes first")
    parser.add_argument("--layers", type=int, help="cut the default model to N blocks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--reuse", action="store_true", help="reuse runs with the same key")
    parser.add_argument("--quick", action="store_true", help="tiny settings, table under --work")
    parser.add_argument("--name", default="profile", help="result file stem in eval/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "eval/profile_run.py", *(argv or sys.argv[1:])])
    sets = [*(QUICK_SETS if args.quick else []), *args.sets, f"threads={args.threads}"]
    full_depth = 0
    if args.layers:
        model = truncated_default_model(args.work, args.layers)
        full_depth = json.loads((model / "full_depth.json").read_text())["num_hidden_layers"]
        sets.append(f"model.source={model}")
    versions = {"current": (REPO, "working tree")}
    if args.before:
        tree, commit = code_at(args.before, args.work)
        versions = {f"before ({commit[:7]})": (tree, commit), **versions}
    runs: dict[str, dict] = {}
    for recipe in args.recipes:
        runs[recipe.stem] = {}
        for label, (code, commit) in versions.items():
            tag = f"{recipe.stem}-{'current' if code == REPO else commit[:10]}"
            key = {"recipe": digest(recipe.resolve()), "sets": sets, "code": commit}
            runs[recipe.stem][label] = cached_step(
                args.work / f"{tag}.json", args.reuse, run_recipe, code, recipe,
                args.work / tag, sets, args.work / f"{tag}.log", key=key,
            )  # fmt: skip
    doc = {
        **result_header(command, args.quick, REPO),
        "recipes": [str(r) for r in args.recipes],
        "sets": sets,
        "layers": args.layers,
        "full_depth": full_depth,
        "runs": runs,
        "invocations": [command],
    }
    folder = args.work if args.quick else RESULTS
    (folder / f"{args.name}.json").write_text(json.dumps(doc, indent=2))
    (folder / f"{args.name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
