"""Print a summary of a model file: ``python tools/inspect_model.py PATH [--no-tensors]``.

PATH is a safetensors folder (AutoAWQ GEMM, compressed-tensors pack-quantized or plain Hugging
Face) or a .gguf file. The summary gives the format, the quantization config, every tensor
(shape, dtype, bytes; for packed linears the logical [out, in] shape, bits and group size)
and totals.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where its name would shadow the
# standard library's `inspect` (which torch imports); put the repository root there instead.
_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOOLS_DIR]
sys.path.insert(0, os.path.dirname(_TOOLS_DIR))

import argparse  # noqa: E402
import json  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from llmquant.formats import detect_format  # noqa: E402
from llmquant.tensors import SafetensorsFolder, read_config  # noqa: E402

MAX_VALUE_CHARS = 100
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _packed_modules(fmt: str, quant: dict, tensors: SafetensorsFolder) -> dict[str, str]:
    """module -> "int4 g128 asym [out, in]" for every packed linear of the folder."""
    found: dict[str, str] = {}
    for name in tensors.names():
        if fmt == "awq-gemm" and name.endswith(".qweight"):
            module = name.removesuffix(".qweight")
            in_f, words = tensors.shape(name)
            groups, _ = tensors.shape(f"{module}.scales")
            found[module] = f"int4 g{in_f // groups} asym [{words * 8}, {in_f}]"
        elif fmt == "compressed-tensors" and name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            out_f, in_f = tensors.get(f"{module}.weight_shape").tolist()
            _, groups = tensors.shape(f"{module}.weight_scale")
            bits = _ct_bits(quant, module)
            kind = "asym" if f"{module}.weight_zero_point" in tensors else "sym"
            group = "channel" if groups == 1 else f"g{in_f // groups}"
            found[module] = f"int{bits} {group} {kind} [{out_f}, {in_f}]"
    return found


def _ct_bits(quant: dict, module: str) -> str:
    groups = quant.get("config_groups", {}).values()
    for group in groups:
        if module in group.get("targets", []):
            return str(group["weights"]["num_bits"])
    for group in groups:
        if "Linear" in group.get("targets", []):
            return str(group["weights"]["num_bits"])
    return "?"


def inspect_folder(path: Path, show_tensors: bool) -> None:
    fmt = detect_format(path)
    config = read_config(path)
    quant = config.get("quantization_config") or {}
    tensors = SafetensorsFolder(path)
    print(f"path:    {path}")
    print(f"format:  {fmt}")
    dtype = config.get("dtype") or config.get("torch_dtype")
    print(f"model:   {config.get('architectures')} dtype={dtype}")
    if quant:
        print("quantization_config:")
        print("  " + json.dumps(quant, indent=2, sort_keys=True).replace("\n", "\n  "))
    packed = _packed_modules(fmt, quant, tensors)
    dtypes: Counter[str] = Counter()
    total = 0
    rows = []
    for name in sorted(tensors.names()):
        shape, dtype = list(tensors.shape(name)), tensors.dtype(name)
        n = 1
        for d in shape:
            n *= d
        size = n * _DTYPE_BYTES.get(dtype, 0)
        total += size
        dtypes[dtype] += size
        module = name.rsplit(".", 1)[0]
        note = packed.get(module, "") if name.endswith((".qweight", ".weight_packed")) else ""
        rows.append(f"  {name:60s} {str(shape):18s} {dtype:5s} {size:>12,d} B  {note}")
    if show_tensors:
        print(f"tensors ({len(rows)}):")
        print("\n".join(rows))
    kinds = Counter(v.rsplit(" [", 1)[0] for v in packed.values())  # "int4 g32 asym"
    by_kind = ", ".join(f"{k}: {c}" for k, c in sorted(kinds.items()))
    print(f"packed linears: {len(packed)}" + (f" ({by_kind})" if by_kind else ""))
    print("bytes by dtype: " + ", ".join(f"{k} {_mb(v)}" for k, v in sorted(dtypes.items())))
    n_files = len(set(tensors.file_of.values()))
    print(f"total:   {len(rows)} tensors, {_mb(total)} in {n_files} file(s)")


def inspect_gguf(path: Path, show_tensors: bool) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    print(f"path:    {path}")
    print("format:  gguf")
    print(f"metadata ({len(reader.fields)} keys):")
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            kind = field.types[-1].name.lower()
            print(f"  {key:45s} [{kind} x {len(field.data)}]")
        else:
            print(f"  {key:45s} {_short(field.contents())}")
    types: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    if show_tensors:
        print(f"tensors ({len(reader.tensors)}):")
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        types[kind] += 1
        sizes[kind] += int(tensor.n_bytes)
        if show_tensors:
            dims = [int(d) for d in tensor.shape]  # ne order: innermost (row length) first
            print(f"  {tensor.name:40s} ne={str(dims):18s} {kind:6s} {int(tensor.n_bytes):>12,d} B")
    print(
        "tensors by type: " + ", ".join(f"{k} x{types[k]} {_mb(sizes[k])}" for k in sorted(types))
    )
    print(f"total:   {len(reader.tensors)} tensors, {_mb(sum(sizes.values()))} of tensor data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--no-tensors", action="store_true", help="totals only")
    args = parser.parse_args(argv)
    try:
        if detect_format(args.path) == "gguf":
            inspect_gguf(args.path, not args.no_tensors)
        else:
            inspect_folder(args.path, not args.no_tensors)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
