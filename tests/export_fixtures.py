"""Tiny source models and run folders (RunFolder) for the export tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from llmquant.dtypes import dtype_name
from llmquant.quant import grid as int_grid
from llmquant.quant.plan import QuantizerPlan
from llmquant.quant.quantizers import IntQuantizer
from llmquant.quant.results import BlockResult, LinearResult
from llmquant.runfolder import RunFolder
from llmquant.tensors import config_dtype, read_config

TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"model_max_length": 128}',
    "special_tokens_map.json": '{"bos_token": "<s>"}',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
}


def make_source(
    folder: Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
    seed: int = 0,
    **overrides,
) -> Path:
    """A randomly initialised tiny causal LM saved with save_pretrained, plus tokenizer files."""
    torch.manual_seed(seed)
    kwargs = {**TINY, "tie_word_embeddings": tie, **overrides}
    config = LlamaConfig(**kwargs) if arch == "llama" else Qwen2Config(**kwargs)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        # Non-zero biases and norms so that a dropped or mis-cast tensor changes the logits.
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def decoder_linears(model) -> dict[int, list[str]]:
    """Full names of the nn.Linear modules of each decoder block."""
    out: dict[int, list[str]] = {}
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        out[index] = [
            prefix + name
            for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear)
        ]
    return out


GridFor = Callable[[str], int_grid.IntGrid | None]


def make_run(source: Path, blocks_dir: Path, grid_for: GridFor | int_grid.IntGrid) -> RunFolder:
    """Quantize every decoder linear of ``source`` (RTN) and save one block file per layer.

    ``grid_for(module)`` may return None to leave a linear unquantized: it is left out of the
    run's plan and stays float (no codes), as the recipe's ``ignore`` makes it.
    """
    if isinstance(grid_for, int_grid.IntGrid):
        fixed = grid_for
        grid_for = lambda module: fixed  # noqa: E731
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    state = model.state_dict()
    quantizers: dict[int_grid.IntGrid, IntQuantizer] = {}  # one quantizer per distinct grid
    planned: dict[str, IntQuantizer] = {}
    blocks: list[BlockResult] = []
    for index, linears in decoder_linears(model).items():
        prefix = f"model.layers.{index}."
        tensors = {k: v.clone() for k, v in state.items() if k.startswith(prefix)}
        results: dict[str, LinearResult] = {}
        for module in linears:
            weight = tensors[f"{module}.weight"]
            grid = grid_for(module)
            codes = None
            if grid is not None:
                planned[module] = quantizers.setdefault(grid, IntQuantizer(grid))
                codes = planned[module].quantize_codes(weight)
                tensors[f"{module}.weight"] = int_grid.dequantize(codes).to(weight.dtype)
            results[module] = LinearResult(
                name=module, weight=tensors[f"{module}.weight"], codes=codes
            )
        blocks.append(BlockResult(index, tensors, results))
    names = sorted({q.name for q in quantizers.values()})
    plan = QuantizerPlan(", ".join(names) or "float", planned)
    dtype = dtype_name(config_dtype(read_config(source)))  # exported as the checkpoint is
    run = RunFolder(
        Path(blocks_dir), Path(source), len(blocks), fingerprint="test", plan=plan, dtype=dtype
    )
    for block in blocks:
        run.save_block(block)
    run.write_manifest()
    return RunFolder.open(blocks_dir)


def reference_model(run: RunFolder, dtype: torch.dtype | None = None):
    """The source model with every block tensor replaced by the run's (dequantized) values."""
    model = AutoModelForCausalLM.from_pretrained(run.source_dir, dtype=dtype).eval()
    state = {}
    for block in run.iter_blocks():
        state.update(block.tensors)
    model.load_state_dict(state, strict=False)
    return model


def model_from_state(source: Path, state: dict[str, torch.Tensor]):
    """A model of ``source``'s architecture loaded from a full state dict (strict)."""
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    return model


def logits(model, seed: int = 1, length: int = 24) -> torch.Tensor:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} x max |expected| {scale:.3e}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
