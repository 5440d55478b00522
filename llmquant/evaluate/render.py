"""Evaluation results as a Markdown table and a PNG of PPL and KLD against bits per weight."""

from __future__ import annotations

import os
from pathlib import Path


def markdown(results: dict) -> str:
    base = results["baseline"]["name"]
    base_ppl = results["models"][base]["ppl"]
    w = results["windows"]
    lines = [
        f"# Evaluation: {results['job']['name']}",
        "",
        f"{w['n']} windows x {w['seq_len']} tokens of `{results['job']['text']['source']}` "
        f"(held-out part); baseline `{base}`.",
        "",
        "| model | runtime | bpw | PPL | ± se | PPL ratio | KLD mean | KLD median | KLD p99 "
        "| top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        kld = (
            f"{m['kld_mean']:.5f} | {m['kld_median']:.5f} | {m['kld_p99']:.4f} "
            f"| {m['top1_agreement']:.2%}"
            if "kld_mean" in m
            else "- | - | - | -"
        )
        flag = " (calibration overlap!)" if m.get("overlap") else ""
        lines.append(
            f"| {name}{flag} | {m['runtime']} | {m['bpw']:.2f} | {m['ppl']:.4f} | "
            f"{m['ppl_se']:.4f} | {m['ppl'] / base_ppl:.4f} | {kld} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """PPL and KLD against bits per weight, baseline marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baseline"]["name"]
    fig, (ax_ppl, ax_kld) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, m in results["models"].items():
        marker = "*" if name == base else "o"
        ax_ppl.scatter(m["bpw"], m["ppl"], marker=marker, s=90 if name == base else 40)
        ax_ppl.annotate(
            name, (m["bpw"], m["ppl"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
        if "kld_mean" in m:
            ax_kld.scatter(m["bpw"], m["kld_mean"], s=40)
            ax_kld.annotate(
                name,
                (m["bpw"], m["kld_mean"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax_ppl.axhline(
        results["models"][base]["ppl"], color="grey", ls="--", lw=1, label=f"baseline ({base})"
    )
    ax_ppl.set_xlabel("bits per weight (file size x 8 / parameters)")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.legend(fontsize=8)
    ax_kld.set_xlabel("bits per weight")
    ax_kld.set_ylabel(f"mean KL divergence vs {base}")
    ax_kld.set_yscale("log")
    fig.suptitle(results["job"]["name"])
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
