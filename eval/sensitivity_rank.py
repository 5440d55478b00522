"""Would a linear's own output error rank candidates as the block's output error does?

The size-target allocation (llmquant/formats/gguf_target.py) compares linears by the block's
output error with that linear alone under each candidate GGML type
(``calib.block.candidate_errors``), which costs a block pass per (linear, type). The cheaper
proxy is the linear's own output error, ||x (Q(W) - W)^T||². This script measures both on the
default model's first blocks (full-precision weights, the calibration windows' first tokens)
and prints the Spearman rank correlation of the two over every (linear, type) pair, per block
and pooled: well below 1 means the proxy would allocate differently.

    python eval/sensitivity_rank.py [--blocks 6] [--windows 8] [--types Q4_0 Q5_0 Q8_0 IQ4_NL]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmquant.calib.block import candidate_errors, planned_linears  # noqa: E402
from llmquant.calib.capture import capture_inputs, run_block  # noqa: E402
from llmquant.calib.stats import StatsCollector  # noqa: E402
from llmquant.model.source import resolve_model  # noqa: E402
from llmquant.model.stream import StreamedModel  # noqa: E402
from llmquant.pipeline import load_windows  # noqa: E402
from llmquant.quant.ggml import get_ggml_type  # noqa: E402
from llmquant.quant.ggml.numerics import search_precision  # noqa: E402
from llmquant.quant.quantizers import GgmlQuantizer  # noqa: E402
from llmquant.recipe import load_recipe  # noqa: E402


def ranks(values: list[float]) -> torch.Tensor:
    order = torch.tensor(values).argsort()
    r = torch.empty(len(values))
    r[order] = torch.arange(len(values), dtype=torch.float32)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per measurement")
    parser.add_argument("--types", nargs="+", default=["Q4_0", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0"])
    parser.add_argument("--json", type=Path, help="also write the pairs here")
    args = parser.parse_args(argv)
    model_dir = resolve_model("default", None, None)
    recipe = load_recipe(REPO / "recipes/llama_w4_gguf.yaml",
                         [f"calibration.n_samples={args.windows}"])  # fmt: skip
    streamed = StreamedModel(model_dir, "float32")
    from transformers import AutoTokenizer

    calib, _ = load_windows(recipe, model_dir, AutoTokenizer.from_pretrained(model_dir))
    stream = capture_inputs(streamed, calib, 4)
    quantizers = [GgmlQuantizer(get_ggml_type(t)) for t in args.types]
    pooled_own, pooled_block, rows = [], [], []
    for i in range(args.blocks):
        block = streamed.load_block(i)
        kwargs = stream.kwargs[i]
        linears = planned_linears(block, "", {n for n, _ in block.named_modules()})
        collector = StatsCollector(block, keep_inputs_of=set(linears), keep_batches=1)
        outputs = run_block(block, stream.batches, kwargs)
        collector.remove()
        windows = max(1, args.tokens // stream.batches[0].shape[1])
        x_batch = stream.batches[0][:windows]  # [windows, seq, hidden]
        reference = outputs[0][:windows]
        own, whole = [], []
        for name, module in linears.items():
            x = collector.kept[name][0][:windows].reshape(-1, module.in_features)  # [n, in]
            imp = collector.stats[name].mean_sq
            w = module.weight.data.clone()
            run = functools.partial(lambda b, xb, kw: run_block(b, [xb], kw)[0], block, x_batch,
                                    kwargs)  # fmt: skip
            errors = candidate_errors(module, w, imp, quantizers, run, reference)
            for q in quantizers:
                with search_precision():
                    delta = q.fake_quant(w, imp) - w
                # summed over channels, mean over tokens: the units of candidate_errors
                err = (x @ delta.T).square().sum().item() / x.shape[0]
                own.append(err)
                whole.append(errors[q.name])
                rows.append({"block": i, "linear": name, "type": q.name,
                             "own": err, "block_output": errors[q.name]})  # fmt: skip
        print(f"block {i}: Spearman {spearman(own, whole):.3f} over {len(own)} pairs")
        pooled_own += own
        pooled_block += whole
        stream.batches = outputs
        streamed.free_block(i)
    print(f"pooled over {args.blocks} blocks: Spearman {spearman(pooled_own, pooled_block):.3f} "
          f"over {len(pooled_own)} (linear, type) pairs")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
