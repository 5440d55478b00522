"""SHA-256 of every export file of llmquant run folders, to prove a change kept the bytes.

    python tools/export_digests.py RUN_DIR [RUN_DIR ...] > digests.json
    python tools/export_digests.py --compare digests.json RUN_DIR [RUN_DIR ...]

Digests are keyed ``<run folder name>/<path inside it>``; the block results (``blocks/``, whose
metadata holds timings) and the reports are left out. ``--compare`` prints every file that
differs, is missing or is new, and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

SKIPPED = {"blocks", "report.json", "report.md"}


def digests(run_dirs: list[Path]) -> dict[str, str]:
    out = {}
    for run_dir in run_dirs:
        for path in sorted(Path(run_dir).rglob("*")):
            relative = path.relative_to(run_dir)
            if not path.is_file() or relative.parts[0] in SKIPPED:
                continue
            out[f"{Path(run_dir).name}/{relative}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--compare", type=Path, help="digests JSON to compare with")
    args = parser.parse_args(argv)
    found = digests(args.run_dirs)
    if args.compare is None:
        print(json.dumps(found, indent=2, sort_keys=True))
        return 0
    expected = json.loads(args.compare.read_text())
    differ = 0
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            state = "missing" if name not in found else "new" if name not in expected else "differs"
            print(f"{state}: {name}")
            differ += 1
    print(f"{len(found)} files, {differ} not identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
