"""CLI: ``python -m llmquant.run RECIPE [--set dotted.key=value ...] [--out DIR] [--resume]``.

Exit codes: 0 success, 2 bad input (the message names what was wrong), 1 internal failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmquant.cli import run_command, setup_logging
from llmquant.pipeline import run
from llmquant.recipe import load_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmquant.run", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set quant.bits=8 (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default runs/<recipe name>)")
    parser.add_argument(
        "--resume", action="store_true", help="reuse finished block results in the output folder"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        recipe = load_recipe(args.recipe, args.set)
        out_dir = args.out or Path("runs") / recipe.name
        report = run(recipe, out_dir, resume=args.resume)
        print(summary(report, out_dir))
        return 0

    return run_command(body)


def summary(report: dict, out_dir: Path) -> str:
    ppl = report.get("ppl", {})
    lines = [f"report: {out_dir / 'report.json'}"]
    for name, value in ppl.items():
        lines.append(f"perplexity {name}: {value:.4f}")
    if "baseline" in ppl and len(ppl) > 1:
        for name, value in ppl.items():
            if name != "baseline":
                lines.append(f"ratio {name}/baseline: {value / ppl['baseline']:.4f}")
    for name, path in report.get("outputs", {}).items():
        lines.append(f"output {name}: {path}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
