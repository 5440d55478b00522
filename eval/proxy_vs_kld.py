"""Which candidate error predicts what a type change does to the model's KL divergence?

The size-target allocation (llmquant/formats/gguf_target.py) sums, over linears, a block output
error measured with each linear alone under each candidate type, and assumes that sum tracks the
model's KL divergence. This script tests that on a real model, against the truth:

- base: every linear of the model at ``--base`` (falling back as llama-quantize does where its
  block does not fit a row), quantized with its activations' mean square as importance;
- truth: for a linear and a type, KLD(base with that linear at that type) - KLD(base), the KL
  divergence of the full model's next-token distributions from full precision's, on held-out
  windows (the blocks before the changed one are reused, so only the rest is run);
- proxies, each as (error at the type) - (error at the base type), the block run alone on the
  calibration tokens the pipeline measures (``awq.clip_n_tokens`` of them), the other linears at
  full precision as in ``calib.block``: ``abs`` (||δ||² per token), ``rel_sum`` (Σ||δ_t||² /
  Σ||y_t||², what e4489b1 allocates with), ``rel_tok`` (mean over tokens of ||δ_t||²/||y_t||²:
  what the next block's RMSNorm sees, to first order), ``rel_tok_g`` (the same with each channel
  of δ weighted by the square of the next reader's norm weight), ``rel_tok_x_gain`` (``rel_tok``
  times the block's downstream gain, what the allocation uses since the commit that adds it:
  ``llmquant.calib.downstream`` on the same tokens).

It prints, per proxy, the Spearman rank correlation with the truth over every (linear, type) pair,
the Pearson correlation of their logs, and the median ratio truth / proxy per block (a proxy the
allocator can sum should have the same ratio in every block).

    python eval/proxy_vs_kld.py [--model smollm2|gemma] [--base IQ4_XS] [--every 3] \
        [--types Q3_K Q4_1 Q8_0] [--eval-windows 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

from bench_mixed import model_overrides  # noqa: E402
from sensitivity_rank import spearman  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llmquant.calib.downstream import DownstreamGain  # noqa: E402
from llmquant.export.gguf.mixes import fallback_type  # noqa: E402
from llmquant.model.source import resolve_model  # noqa: E402
from llmquant.pipeline import load_windows  # noqa: E402
from llmquant.quant.ggml import get_ggml_type  # noqa: E402
from llmquant.quant.quantizers import GgmlQuantizer  # noqa: E402
from llmquant.recipe import load_recipe  # noqa: E402

PROXIES = ("abs", "rel_sum", "rel_tok", "rel_tok_g", "rel_tok_x_gain")


class LayerInputs:
    """Each decoder layer's input hidden states and keyword arguments on one forward pass."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.hidden: list[torch.Tensor] = [None] * len(layers)
        self.kwargs: list[dict] = [None] * len(layers)
        self._hooks = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            self.hidden[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            self.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def kld(log_p: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p || q), p given as log-probabilities [tokens, vocab]."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "gemma"], default="smollm2")
    parser.add_argument("--base", default="IQ4_XS")
    parser.add_argument("--types", nargs="+", default=["Q3_K", "Q4_0", "Q4_1", "Q8_0"])
    parser.add_argument("--every", type=int, default=3, help="measure every n-th block")
    parser.add_argument("--calib-windows", type=int, default=16, help="for the importance")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    overrides = [
        f"calibration.n_samples={args.calib_windows}",
        f"evaluation.n_windows={args.eval_windows}",
        *model_overrides(args.model),
    ]
    recipe = load_recipe(REPO / "recipes/llama_w4_gguf.yaml", overrides)
    model_dir = resolve_model(recipe.model.source, recipe.model.revision, recipe.model.gguf_file)
    calib, evals = load_windows(recipe, model_dir, AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.model.layers

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm(hidden)).reshape(-1, model.config.vocab_size)

    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    # Importance: each linear's input mean square on the calibration windows (full precision).
    sums: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, n=n: sums.__setitem__(n, sums.get(n, 0) + a[0].reshape(-1, a[0].shape[-1])
                                             .square().sum(0)))
        for n, m in linears.items()]  # fmt: skip
    calib_inputs = LayerInputs(layers)
    # The first window's layer inputs: the proxies' tokens (512, the pipeline's clip_n_tokens).
    model(calib[:1], use_cache=False)
    calib_inputs.remove()
    for k in range(1, len(calib)):
        model(calib[k : k + 1], use_cache=False)
    for h in hooks:
        h.remove()
    n_tok = calib.numel()
    importance = {n: s / n_tok for n, s in sums.items()}
    fp_weights = {n: m.weight.data.clone() for n, m in linears.items()}

    def quantized(name: str, type_name: str) -> torch.Tensor:
        w = fp_weights[name]
        return GgmlQuantizer(get_ggml_type(type_name)).fake_quant(w, importance[name]).to(w.dtype)

    def base_type(name: str) -> str:
        return fallback_type(fp_weights[name].shape[1], args.base)

    # Downstream gains, as the pipeline measures them (every layer's linears noised).
    carrier = DownstreamGain(calib_inputs.hidden[0])
    for i, layer in enumerate(layers):
        noised = [m for n, m in linears.items() if n.split(".")[0] == str(i)]
        carrier.step(i, layer, calib_inputs.kwargs[i], noised)
    gains = carrier.gains(lambda h: model.lm_head(model.model.norm(h)))
    print("downstream gains:", " ".join(f"{g:.3g}" for g in gains.values()))
    # Proxies: each layer alone on its full-precision input, one linear changed at a time.
    blocks = list(range(0, len(layers), args.every))
    proxies: dict[tuple[str, str], dict[str, float]] = {}
    for i in blocks:
        x, kw = calib_inputs.hidden[i], calib_inputs.kwargs[i]
        y = run_layer(layers[i], x, kw)
        y_sq = y.square().sum(-1).reshape(-1)  # [tokens]
        # The next reader's norm weight per channel (a norm of ones is its weight, with
        # Gemma's 1 + w included): what the next block's input sees of each channel.
        reader = layers[i + 1].input_layernorm if i + 1 < len(layers) else model.model.norm
        gain = reader(torch.ones(1, y.shape[-1])).reshape(-1).square()  # [hidden]
        for name in [n for n in linears if n.split(".")[0] == str(i)]:
            module = linears[name]
            for t in {base_type(name), *args.types}:
                if fp_weights[name].shape[1] % get_ggml_type(t).block_size:
                    continue
                module.weight.data = quantized(name, t)
                delta_sq = (run_layer(layers[i], x, kw) - y).square()  # [1, seq, hidden]
                d_sq = delta_sq.sum(-1).reshape(-1)
                module.weight.data = fp_weights[name]
                proxies[name, t] = {
                    "abs": float(d_sq.mean()),
                    "rel_sum": float(d_sq.sum() / y_sq.sum()),
                    "rel_tok": float((d_sq / y_sq).mean()),
                    "rel_tok_g": float(((delta_sq * gain).sum(-1).reshape(-1) / y_sq).mean()),
                    "rel_tok_x_gain": float((d_sq / y_sq).mean()) * gains[i],
                }
    # Truth: the whole model at the base types, then one linear changed at a time.
    fp_logp = torch.log_softmax(model(evals, use_cache=False).logits.float(), -1).reshape(
        -1, model.config.vocab_size)  # [windows * seq, vocab]  # fmt: skip
    for name, module in linears.items():
        module.weight.data = quantized(name, base_type(name))
    base_inputs = LayerInputs(layers)
    base_logits = model(evals, use_cache=False).logits.reshape(-1, model.config.vocab_size)
    base_inputs.remove()
    h = base_inputs.hidden[0]
    for j in range(len(layers)):
        h = run_layer(layers[j], h, base_inputs.kwargs[j])
    # The layer-by-layer rerun the truths use must be the model's own forward.
    torch.testing.assert_close(head(h), base_logits, rtol=1e-4, atol=1e-3)
    base_kld = kld(fp_logp, base_logits)
    print(f"{args.model}, base {args.base}: KLD {base_kld:.5f} on {evals.numel()} tokens")
    rows = []
    started = time.perf_counter()
    for (name, t), proxy in sorted(proxies.items(), key=lambda kv: int(kv[0][0].split(".")[0])):
        i = int(name.split(".")[0])
        if t == base_type(name):
            continue
        module = linears[name]
        module.weight.data = quantized(name, t)
        h = base_inputs.hidden[i]
        for j in range(i, len(layers)):
            h = run_layer(layers[j], h, base_inputs.kwargs[j])
        module.weight.data = quantized(name, base_type(name))
        truth = kld(fp_logp, head(h)) - base_kld
        at_base = proxies[name, base_type(name)]
        rows.append({"block": i, "linear": name, "type": t, "truth": truth,
                     **{p: proxy[p] - at_base[p] for p in PROXIES}})  # fmt: skip
    print(f"{len(rows)} (linear, type) pairs in {time.perf_counter() - started:.0f} s")
    truths = [r["truth"] for r in rows]
    for p in PROXIES:
        values = [r[p] for r in rows]
        both = [(math.log(abs(r["truth"])), math.log(abs(r[p]))) for r in rows
                if r["truth"] * r[p] > 0]  # fmt: skip
        a, b = torch.tensor(both).T
        pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        per_block = []
        for i in blocks:
            ratios = torch.tensor([r["truth"] / r[p] for r in rows if r["block"] == i and r[p] > 0])
            per_block.append(f"{float(ratios.median()):.3g}" if len(ratios) else "-")
        print(f"{p:8s} Spearman {spearman(values, truths):.3f}  log-Pearson {pearson:.3f} "
              f"(same sign {len(both)}/{len(rows)})  truth/proxy per block: "
              f"{' '.join(per_block)}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"base_kld": base_kld, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
