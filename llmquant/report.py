"""report.json (the contract other tools rely on) and report.md (what a person reads)."""

from __future__ import annotations

import json
import logging
import platform
import resource
from importlib import metadata
from pathlib import Path

from llmquant.cache import atomic_write_text
from llmquant.recipe import Recipe

_PACKAGES = ("llmquant", "torch", "transformers", "safetensors", "datasets", "gguf", "accelerate")


log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def render_markdown(report: dict) -> str:
    ppl = report.get("ppl", {})
    lines = [f"# llmquant report: {report['recipe']['name']}", ""]
    lines.append(f"- model: `{report['recipe']['model']['source']}` ({report.get('arch')})")
    awq = "on" if report["recipe"]["awq"]["enabled"] else "off"
    lines.append(f"- quantizer: {report.get('quantizer')}, AWQ {awq}")
    if "runtime" in report:
        rt = report["runtime"]
        lines.append(
            f"- ran on {rt['device']}: weights {rt['dtype']}, compute {rt['compute_dtype']}, "
            f"activation streams on the {rt['streams_on']}"
        )
    ev = report.get("eval", {})
    lines.append(
        f"- evaluation: {ev.get('windows')} windows x {ev.get('seq_len')} tokens of "
        f"`{ev.get('text')}`; calibration {ev.get('calibration_windows')} x "
        f"{ev.get('calibration_seq_len')}"
    )
    lines += ["", "| model | perplexity | ± se | vs baseline |", "|---|---|---|---|"]
    detail = report.get("ppl_detail", {})
    base = ppl.get("baseline")
    for name, value in ppl.items():
        se = detail.get(name, {}).get("ppl_se", float("nan"))
        ratio = f"{value / base:.4f}x" if base else ""
        lines.append(f"| {name} | {value:.4f} | {se:.4f} | {ratio} |")
    sizes = report.get("sizes", {})
    if sizes:
        lines += ["", "| output | bytes |", "|---|---|"]
        lines += [f"| {k} | {v:,} |" for k, v in sizes.items()]
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.get("timings", {}).items()]
    if report.get("profile"):
        lines += ["", "Block loop by part (seconds, all blocks):", "", "| part | seconds |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.1f} |" for k, v in report["profile"].items()]
    for name, allocation in report.get("allocation", {}).items():
        gains = {b["block"]: b["downstream_gain"] for b in report.get("blocks", [])
                 if "downstream_gain" in b}  # fmt: skip
        lines += allocation_markdown(name, allocation, gains)
    runtime = report.get("runtime", {})
    memory = f"peak RSS: {report['peak_rss_bytes'] / 2**30:.2f} GiB"
    if runtime.get("predicted_peak_rss_bytes"):
        memory += f" (predicted {runtime['predicted_peak_rss_bytes'] / 2**30:.2f} GiB)"
    if runtime.get("peak_device_bytes") is not None:
        device_gib = runtime["peak_device_bytes"] / 2**30
        memory += f"; peak {runtime['device']} memory {device_gib:.2f} GiB"
    lines += ["", memory, ""]
    return "\n".join(lines)


REPORT_FILES = ("report.json", "report.md")


def remove_report(out_dir: Path) -> None:
    """Take an earlier run's report out of ``out_dir`` before this run writes anything there:
    a report sits only beside the exports of the run it describes (a run that fails midway
    leaves no report, rather than an old one next to new files)."""
    for name in REPORT_FILES:
        path = Path(out_dir) / name
        if path.is_file():
            log.info("removing %s of an earlier run; this run writes its own when complete", path)
            path.unlink()


def write_report(recipe: Recipe, report: dict, out_dir: Path) -> dict:
    """Complete ``report`` with the contract's keys and write both files atomically."""
    report = {
        "recipe": recipe.model_dump(mode="json"),
        "versions": versions(),
        "peak_rss_bytes": peak_rss_bytes(),
        **report,
    }
    sizes = {"source": folder_bytes(Path(report["model_dir"]))} if "model_dir" in report else {}
    for name, path in report.get("outputs", {}).items():
        sizes[name] = folder_bytes(Path(path))
    report["sizes"] = sizes
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return report


def allocation_markdown(name: str, allocation: dict, gains: dict[int, float]) -> list[str]:
    """The allocated types, one row per layer (which layers got more bits), beside the layer's
    downstream gain (what its errors were weighted by)."""
    (key, value), = allocation["target"].items()
    real = allocation.get("file_bytes")
    # A folder (compressed-tensors) has no one file size: its prediction is of the linears.
    size = (f"file {real or 0:,} bytes (predicted {allocation['predicted_bytes']:,})"
            if "file_bytes" in allocation or "file" not in allocation
            else f"linears {allocation['linears_bytes']:,} bytes")  # fmt: skip
    lines = ["", f"Mixed precision ({name}, {key} {value}): linears at "
             f"{allocation['linears_bpw']:.3f} bits per weight; {size}; "
             + ", ".join(f"{n} {t}" for t, n in allocation["counts"].items()), ""]  # fmt: skip
    by_layer: dict[int, dict[str, str]] = {}
    for tensor, choice in allocation["types"].items():
        parts = tensor.split(".")
        if parts[0] == "blk" and len(parts) >= 3:  # GGUF names: blk.N.attn_q.weight
            by_layer.setdefault(int(parts[1]), {})[parts[2]] = choice
            continue
        # Module paths: model.layers.N.self_attn.q_proj
        layer = next((k for k, part in enumerate(parts) if part.isdigit()), None)
        if layer is not None and layer + 1 < len(parts):
            by_layer.setdefault(int(parts[layer]), {})[".".join(parts[layer + 1 :])] = choice
    kinds = sorted({k for row in by_layer.values() for k in row})
    lines += ["| layer | downstream gain | " + " | ".join(kinds) + " |",
              "|---" * (len(kinds) + 2) + "|"]  # fmt: skip
    for layer in sorted(by_layer):
        row = by_layer[layer]
        gain = f"{gains[layer]:.3g}" if layer in gains else ""
        lines.append(f"| {layer} | {gain} | " + " | ".join(row.get(k, "") for k in kinds) + " |")
    return lines
