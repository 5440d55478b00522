"""Helpers shared by the benchmark scripts in eval/: measured subprocesses, resumable steps,
and the versions and commit a result was made with."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("llmquant", "torch", "transformers", "accelerate", "safetensors", "gguf"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# Committed tables are outputs, not code: a rewritten one marks no step as made by other code.
NOT_RESULTS = ":(exclude)eval/results"


def git_state() -> str:
    """The commit benchmarked, and whether the work tree had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", NOT_RESULTS],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head} (uncommitted changes)" if dirty else head


def run_recipe(
    recipe: str, out: Path, sets: list[str], log_path: Path, resume: bool = False
) -> tuple[dict, dict]:
    """``python -m llmquant.run RECIPE --set ...`` into ``out``: the measured run
    (:func:`run_measured`) and the report.json it wrote."""
    cmd = [
        sys.executable, "-m", "llmquant.run", recipe,
        *[x for item in sets for x in ("--set", item)],
        "--out", str(out), *(["--resume"] if resume else []),
    ]  # fmt: skip
    measured = run_measured(cmd, log_path)
    return measured, json.loads((out / "report.json").read_text())


def run_measured(cmd: list[str], log_path: Path, cwd: Path = REPO) -> dict:
    """Run ``cmd`` in ``cwd``; its wall time, CPU seconds and peak RSS (this child's rusage);
    raise if it fails."""
    log.info("running: %s (log %s)", shlex.join(cmd), log_path)
    started = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}; log tail:\n{tail}")
    return {
        "command": shlex.join(cmd),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_bytes": int(usage.ru_maxrss) * 1024,
    }


def code_version() -> str:
    """What the measured code is: the committed trees of llmquant/, eval/, tools/ and recipes/
    and any uncommitted change there but in eval/results (a step made by other code or recipes
    is not reused)."""
    parts = ["llmquant", "eval", "tools", "recipes"]
    try:
        trees = subprocess.run(
            ["git", "rev-parse", *(f"HEAD:{p}" for p in parts)],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", *parts, NOT_RESULTS],
            cwd=REPO, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return hashlib.sha256(trees.encode() + diff).hexdigest()[:16]


def digest(*items) -> str:
    """A short content hash of tensors, files and plain values, for step keys."""
    h = hashlib.sha256()
    for item in items:
        if hasattr(item, "numpy"):  # a tensor: its values, dtype and shape
            import torch

            t = item.detach().cpu().contiguous().view(-1)  # [numel]
            h.update(f"{item.dtype}{tuple(item.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(item, Path) and item.is_file():
            with item.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cached_step(path: Path, reuse: bool, fn, *fn_args, key: dict) -> dict:
    """``fn(*fn_args)``, saved to ``path`` with ``key`` (what the result depends on: settings,
    content digests of its inputs) and the code version. ``--reuse`` takes the saved result only
    when both match, so a resumed benchmark never mixes settings or code versions."""
    full_key = {"key": json.loads(json.dumps(key, sort_keys=True, default=str)),
                "code": code_version()}  # fmt: skip
    if reuse and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("made_with") == full_key:
            log.info("reusing %s", path)
            return saved["result"]
        log.info("not reusing %s: made with other settings or code", path)
    result = fn(*fn_args)
    if isinstance(result, dict):
        result = {**result, "made_by": made_by()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"made_with": full_key, "result": result}, indent=2))
    os.replace(tmp, path)
    return result


def made_by() -> dict:
    """The invocation that makes a step: its command line, commit and date. A reused step keeps
    the one that made it, so a table resumed across invocations can name each of them."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "git": git_state(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def made_by_lines(steps: list[dict]) -> list[str]:
    """One Markdown bullet per distinct invocation that made ``steps`` (oldest first)."""
    made: dict[tuple[str, str], str] = {}
    for step in steps:
        by = step.get("made_by") or {"command": "an earlier invocation", "git": "?", "date": "?"}
        command = by.get("command") or by.get("invocation", "?")  # older steps: "invocation"
        made.setdefault((command, by["git"]), by["date"])
    ordered = sorted(made.items(), key=lambda item: item[1])
    return [f"- `{command}` at {date}, git {git}" for (command, git), date in ordered]


def result_header(command: str, quick: bool, model_dir: Path) -> dict:
    """The fields every benchmark result starts with: when, how, where and with what code."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "machine": f"{os.cpu_count()} CPU cores (shared), {platform.machine()}",
        "quick": quick,
        "model_dir": str(model_dir),
        "versions": versions(),
        "git": git_state(),
    }


def se_bars(ours: dict, theirs: dict, key: str) -> str:
    """"inside" when the means ``key`` of two rows differ by at most the sum of their standard
    errors (``key + "_se"``), else "outside": the verdict every benchmark table prints."""
    bars = ours[key + "_se"] + theirs[key + "_se"]
    return "inside" if abs(ours[key] - theirs[key]) <= bars else "outside"
