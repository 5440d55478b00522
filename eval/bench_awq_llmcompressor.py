"""llm-compressor side of the AWQ benchmark; runs INSIDE its own virtual environment.

llmcompressor 0.14.0.1 pins transformers <= 5.17, so it lives in
``~/.cache/llmquant/venv-llmcompressor`` (see eval/README.md) and ``eval/bench_awq.py`` calls
this script with that environment's python. Two subcommands, each a separate process so the
quantization's peak RSS is not mixed with anything else:

- ``quantize``: load the float model folder, run ``oneshot`` with ``AWQModifier`` followed by
  ``QuantizationModifier`` (int weights, asymmetric, group G, every Linear but lm_head) on the
  first N calibration windows of a ``.pt`` tensor [n, seq] of token ids, save the compressed
  checkpoint, and write wall times and peak RSS to a JSON file.
- ``dequantize``: load that checkpoint with transformers (compressed-tensors, decompressed to
  dense weights) and write a plain float32 safetensors folder with the source folder's tensor
  names and config.json, for llmquant's streamed evaluator in the main environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import time
from importlib import metadata
from pathlib import Path

import torch

log = logging.getLogger("bench_awq_llmcompressor")

_PACKAGES = ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate")


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


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def disable_pin_memory_without_accelerator() -> bool:
    """Make the intermediates cache's ``pin_memory`` a no-op on a machine with no accelerator.

    llmcompressor 0.14.0.1's AWQ pins cached block inputs for faster host-to-device copies;
    ``Tensor.pin_memory()`` raises "Cannot access accelerator device when none is available"
    on a CPU-only machine, and there is nothing to copy to anyway.
    """
    if torch.accelerator.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    def no_pin(self, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin
    return True


def quant_config_groups(bits: int, group_size: int, symmetric: bool) -> dict:
    return {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": group_size,
            },
        }
    }


def calibration_dataset(windows_path: Path, n_samples: int):
    from datasets import Dataset

    windows = torch.load(windows_path)
    if windows.ndim != 2:
        raise ValueError(f"{windows_path}: expected token ids [n, seq], got {tuple(windows.shape)}")
    if n_samples > windows.shape[0]:
        raise ValueError(
            f"{windows_path}: {n_samples} samples asked, the file has {windows.shape[0]} windows"
        )
    rows = windows[:n_samples].tolist()
    mask = [[1] * len(r) for r in rows]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": mask}), windows.shape[1]


def quantize(args: argparse.Namespace) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    patched = disable_pin_memory_without_accelerator()
    torch.manual_seed(0)
    dataset, seq_len = calibration_dataset(args.calib, args.n_samples)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - started

    recipe = [
        AWQModifier(n_grid=args.n_grid, duo_scaling=True),
        QuantizationModifier(
            ignore=["lm_head"],
            config_groups=quant_config_groups(args.bits, args.group_size, symmetric=False),
        ),
    ]
    started = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=args.n_samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - started

    started = time.perf_counter()
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    save_s = time.perf_counter() - started

    return {
        "bits": args.bits,
        "group_size": args.group_size,
        "symmetric": False,
        "n_samples": args.n_samples,
        "seq_len": int(seq_len),
        "n_grid": args.n_grid,
        "pin_memory_patched": patched,
        "load_s": round(load_s, 3),
        "oneshot_s": round(oneshot_s, 3),
        "save_s": round(save_s, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "output": str(args.out),
        "format": json.loads((args.out / "config.json").read_text())
        .get("quantization_config", {})
        .get("format"),
        "versions": versions(),
    }


def source_tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    if not shapes:
        raise FileNotFoundError(f"{folder}: no safetensors weights found")
    return shapes


def distinct_levels(weight: torch.Tensor, group_size: int) -> int:
    """Most distinct values in any group of a dequantized weight (at most 2^bits on a grid)."""
    groups = weight.reshape(weight.shape[0], -1, group_size)  # [out, n_groups, group]
    flat = groups.reshape(-1, group_size)  # [out * n_groups, group]
    return int(max(len(torch.unique(row)) for row in flat[:: max(1, flat.shape[0] // 256)]))


def dequantize(args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.compressed,
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )
    state = model.state_dict()
    wanted = source_tensor_shapes(args.source)
    out: dict[str, torch.Tensor] = {}
    for name, shape in wanted.items():
        if name not in state:
            raise KeyError(f"{args.compressed}: decompressed model has no tensor {name!r}")
        tensor = state[name].detach().to(torch.float32).contiguous()
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{args.compressed}: {name} decompressed to {tuple(tensor.shape)}, the source "
                f"folder has {shape}"
            )
        out[name] = tensor
    probe = "model.layers.0.mlp.down_proj.weight"
    levels = distinct_levels(out[probe], args.group_size) if probe in out else None
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copied = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    for name in copied:
        if (args.source / name).is_file():
            shutil.copy2(args.source / name, tmp / name)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    return {
        "output": str(args.out),
        "n_tensors": len(out),
        "max_levels_per_group_probe": {probe: levels},
        "seconds": round(time.perf_counter() - started, 3),
        "versions": versions(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="AWQ + int quantization with oneshot")
    q.add_argument("--model", type=Path, required=True, help="float HF model folder")
    q.add_argument("--calib", type=Path, required=True, help=".pt token ids [n, seq]")
    q.add_argument("--n-samples", type=int, required=True)
    q.add_argument("--bits", type=int, required=True)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--n-grid", type=int, default=20)
    q.add_argument("--out", type=Path, required=True, help="compressed checkpoint folder")
    q.add_argument("--result", type=Path, required=True, help="JSON file for timings")
    d = sub.add_parser("dequantize", help="compressed checkpoint -> float safetensors folder")
    d.add_argument("--compressed", type=Path, required=True)
    d.add_argument("--source", type=Path, required=True, help="the original float folder")
    d.add_argument("--group-size", type=int, default=64)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--result", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    doc = quantize(args) if args.command == "quantize" else dequantize(args)
    write_json(args.result, doc)
    log.info("%s: %s", args.command, json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
