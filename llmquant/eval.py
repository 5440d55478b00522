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
import logging
import os
import sys
from pathlib import Path

from llmquant.data.text import DataError
from llmquant.evaluate import render
from llmquant.evaluate.job import Job, ModelEntry, Windows, check, load_job, run_job
from llmquant.model.source import SourceError
from llmquant.recipe import RecipeError, TextSource

log = logging.getLogger("llmquant")


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
    )


def _write(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    for key, text in (("json", json.dumps(results, indent=2)), ("md", render.markdown(results))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[key])
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
    parser.add_argument("--out", type=Path, help="output folder (default eval/results/<name>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = (
            load_job(args.check or args.job) if (args.check or args.job) else _job_from_flags(args)
        )
        results = run_job(job)
    except (RecipeError, SourceError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("internal failure")
        return 1
    if args.check:
        if not job.results:
            print(f"error: {args.check}: the job names no `results` file to check", file=sys.stderr)
            return 2
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
