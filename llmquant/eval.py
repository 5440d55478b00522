"""CLI: ``python -m llmquant.eval JOB.yaml`` or flags; ``--check JOB.yaml`` re-runs and compares.

Examples:
  python -m llmquant.eval eval/jobs/smollm2_default.yaml
  python -m llmquant.eval --baseline default --model w4=runs/llama_w4/compressed-tensors \\
      --n-windows 8 --seq-len 512
  python -m llmquant.eval --check eval/jobs/smollm2_default.yaml

Exit codes: 0 success, 2 bad input, 1 internal failure or (with --check) drift past tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmquant.cache import atomic_write_text
from llmquant.cli import run_command, setup_logging
from llmquant.evaluate import render
from llmquant.evaluate.job import Job, ModelEntry, Windows, check, load_job, run_job
from llmquant.recipe import RecipeError, TextSource


def _job_from_flags(args: argparse.Namespace) -> Job:
    models = []
    for item in args.model:
        if "=" not in item:
            raise RecipeError(f"--model {item!r}: expected NAME=PATH")
        name, path = item.split("=", 1)
        models.append(ModelEntry(name=name, path=path, dequantize=args.dequantize_gguf))
    return Job(
        name=args.name,
        text=TextSource(source=args.text),
        windows=Windows(n_windows=args.n_windows, seq_len=args.seq_len),
        baseline=ModelEntry(name="baseline", path=args.baseline),
        models=models,
        device=args.device,
    )


def _write(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    for key, text in (("json", json.dumps(results, indent=2)), ("md", render.markdown(results))):
        atomic_write_text(paths[key], text)
    paths["png"] = render.plot(results, out_dir / "ppl_kld_vs_bpw.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmquant.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", nargs="?", help="evaluation job YAML")
    parser.add_argument("--check", metavar="JOB", help="re-run JOB and compare with its results")
    parser.add_argument("--baseline", default="default")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--text", default="default")
    parser.add_argument("--n-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dequantize-gguf", action="store_true")
    parser.add_argument("--name", default="adhoc")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, help="output folder (default eval/results/<name>)")
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    job_file = args.check or args.job
    job = load_job(job_file) if job_file else _job_from_flags(args)
    if args.check and not job.results:
        raise RecipeError(f"{args.check}: the job names no `results` file to check")
    results = run_job(job)
    if args.check:
        committed = json.loads(Path(job.results).read_text())
        problems = check(results, committed, job.tolerance)
        print(render.markdown(results))
        if problems:
            print("DRIFT past tolerance:\n  " + "\n  ".join(problems))
            return 1
        print(f"check passed: every model within tolerance of {job.results}")
        return 0
    out_dir = args.out or Path("eval") / "results" / job.name
    paths = _write(results, out_dir)
    print(render.markdown(results))
    print(f"results: {paths['json']}\ntable: {paths['md']}\nplot: {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
