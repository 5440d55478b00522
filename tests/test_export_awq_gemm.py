"""AutoAWQ GEMM export: bit layout, reader, a real consumer and conversion to compressed-tensors.

The consumer is transformers 5.23's AWQ integration with GPTQModel's CPU kernels, installed
outside site-packages (see ``gptqmodel_dir``) and run in a subprocess so that its import side
effects stay out of this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_fixtures import (
    SIDE_FILES,
    assert_close_rel,
    make_run,
    make_source,
    model_from_state,
    read_json,
)

from llmquant.export import awq_gemm
from llmquant.export.awq_gemm import write_awq_gemm
from llmquant.export.compressed_tensors import write_compressed_tensors
from llmquant.formats import detect_format, open_output
from llmquant.quant.grid import GroupedCodes, IntGrid
from llmquant.quant.plan import is_ignored
from llmquant.tensors import SafetensorsFolder, load_all, read_config

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
GPTQMODEL_VERSION = "7.7.0"


def read_output(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The plain state dict of an output (packed linears dequantized), opened through the
    format registry, and its config.json."""
    source, _kind = open_output(path)
    return load_all(source), read_config(path)


def read_awq_codes(path: Path) -> dict[str, GroupedCodes]:
    """The integer codes of every packed linear of an AutoAWQ folder, by module path."""
    tensors = SafetensorsFolder(path)
    codes = {}
    for name in tensors.names():
        if name.endswith(".qweight"):
            module = name.removesuffix(".qweight")
            codes[module] = awq_gemm.unpack_linear(
                tensors.get(name), tensors.get(f"{module}.qzeros"), tensors.get(f"{module}.scales")
            )
    return codes


def unless_ignored(grid: IntGrid, ignore: list[str]):
    """``grid_for`` of a run whose plan leaves the linears ``ignore`` names in float."""
    return lambda module: None if is_ignored(module, ignore) else grid


def naive_pack(values: torch.Tensor) -> torch.Tensor:
    """Looped reference: nibble i of word c holds column 8c + AWQ_ORDER[i]."""
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for c in range(cols // 8):
            word = 0
            for i in range(8):
                word |= int(values[r, 8 * c + AWQ_ORDER[i]]) << (4 * i)
            out[r, c] = word - (1 << 32) if word >= 1 << 31 else word
    return out


def autoawq_dequantize(qweight, qzeros, scales) -> torch.Tensor:
    """AutoAWQ's dequantize_gemm as its source defines it (unpack, reverse order, (q-z)*s),
    computed in float32; result [in, out]."""
    shifts = torch.arange(0, 32, 4)
    iweight = (
        (qweight[:, :, None] >> shifts[None, None, :]).to(torch.int8).view(qweight.shape[0], -1)
    )
    izeros = (qzeros[:, :, None] >> shifts[None, None, :]).to(torch.int8).view(qzeros.shape[0], -1)
    order = torch.arange(iweight.shape[-1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].view(-1)
    iweight = torch.bitwise_and(iweight[:, order], 15)
    izeros = torch.bitwise_and(izeros[:, order], 15)
    group = qweight.shape[0] // scales.shape[0]
    zeros = izeros.repeat_interleave(group, dim=0)
    return (iweight - zeros).float() * scales.float().repeat_interleave(group, dim=0)


@pytest.mark.parametrize("rows,cols", [(1, 8), (3, 16), (17, 64), (64, 8), (5, 256)])
def test_pack_matches_naive_packer_and_round_trips(rows, cols):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    values = torch.randint(0, 16, (rows, cols), generator=gen)
    values[0, :8] = torch.tensor([15, 0, 15, 0, 15, 0, 15, 15])  # sign bit and extremes
    packed = awq_gemm.pack_columns(values)
    assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
    assert torch.equal(packed, naive_pack(values))
    assert torch.equal(awq_gemm.unpack_columns(packed), values.to(torch.int16))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        awq_gemm.pack_columns(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="0..15"):
        awq_gemm.pack_columns(torch.full((2, 8), 16))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_llama")
    source = make_source(root / "source", "llama")
    return make_run(source, root / "blocks", IntGrid(4, 32, symmetric=False))


def test_layout_config_and_files(llama_run, tmp_path):
    out = write_awq_gemm(llama_run, tmp_path / "awq")
    config = read_json(out / "config.json")
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    assert detect_format(out) == "awq-gemm"
    for name, text in SIDE_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["awq"]  # no temporary folder left
    tensors = SafetensorsFolder(out)
    for block in llama_run.iter_blocks():
        for module, linear in block.linears.items():
            out_f, in_f = linear.weight.shape
            qweight = tensors.get(f"{module}.qweight")
            qzeros = tensors.get(f"{module}.qzeros")
            scales = tensors.get(f"{module}.scales")
            assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (in_f, out_f // 8))
            assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (in_f // 32, out_f // 8))
            assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (in_f // 32, out_f))
            assert f"{module}.weight" not in tensors
            # The loaders' dequantization gives back exactly the weight the pipeline evaluated.
            expected = block.tensors[f"{module}.weight"]
            assert torch.equal(autoawq_dequantize(qweight, qzeros, scales).T, expected)
    assert tensors.get("model.embed_tokens.weight").dtype == torch.float32


def test_reader_gives_the_runs_state_dict(llama_run, tmp_path):
    out = write_awq_gemm(llama_run, tmp_path / "awq")
    state, config = read_output(out)
    assert config["quantization_config"]["quant_method"] == "awq"
    source = SafetensorsFolder(llama_run.source_dir)
    expected = {name: source.get(name) for name in source.names()}
    for block in llama_run.iter_blocks():
        expected.update(block.tensors)
    assert sorted(state) == sorted(expected)
    for name, tensor in state.items():
        assert torch.equal(tensor.float(), expected[name].float()), name
    codes = read_awq_codes(out)
    for block in llama_run.iter_blocks():
        for module, linear in block.linears.items():
            assert torch.equal(codes[module].codes, linear.codes.codes), module
            assert torch.equal(codes[module].zeros, linear.codes.zeros), module
            assert torch.equal(codes[module].scales, linear.codes.scales), module
            assert codes[module].grid == linear.codes.grid


def test_qwen2_bias_and_per_channel(tmp_path):
    source = make_source(tmp_path / "source", "qwen2")
    run = make_run(source, tmp_path / "blocks", IntGrid(4, -1, symmetric=False))
    out = write_awq_gemm(run, tmp_path / "awq")
    assert read_json(out / "config.json")["quantization_config"]["group_size"] == -1
    state, _ = read_output(out)
    block = run.block(0)
    bias = "model.layers.0.self_attn.q_proj.bias"
    # AutoAWQ's WQLinear_GEMM keeps biases in float16.
    assert state[bias].dtype == torch.float16
    assert torch.equal(state[bias], block.tensors[bias].half())
    scales = SafetensorsFolder(out).get("model.layers.0.self_attn.q_proj.scales")
    assert tuple(scales.shape) == (1, 128)
    weight = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(state[weight], block.tensors[weight])


@pytest.mark.parametrize(
    "grid,words",
    [
        (IntGrid(4, 32, symmetric=True), "symmetric"),
        (IntGrid(8, 32, symmetric=False), "bits=8"),
        (IntGrid(3, 32, symmetric=False), "bits=3"),
    ],
)
def test_unsupported_grid_fails_cleanly(llama_run, tmp_path, grid, words):
    run = make_run(llama_run.source_dir, tmp_path / "blocks", grid)
    target = tmp_path / "out" / "awq"
    with pytest.raises(ValueError, match=words) as err:
        write_awq_gemm(run, target)
    assert "compressed-tensors" in str(err.value)
    # Refused before writing: neither the output nor a temporary exists.
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_failed_write_keeps_an_existing_output(llama_run, tmp_path):
    target = tmp_path / "awq"
    write_awq_gemm(llama_run, target)
    before = sorted(p.name for p in target.iterdir())
    run = make_run(llama_run.source_dir, tmp_path / "blocks", IntGrid(8, 32, symmetric=False))
    with pytest.raises(ValueError):
        write_awq_gemm(run, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq", "blocks"]


def test_ignore_keeps_linears_in_float(llama_run, tmp_path):
    ignore = ["lm_head", "re:.*mlp\\.down_proj"]
    grid_for = unless_ignored(IntGrid(4, 32, symmetric=False), ignore)
    run = make_run(llama_run.source_dir, tmp_path / "blocks", grid_for)
    out = write_awq_gemm(run, tmp_path / "awq")
    config = read_json(out / "config.json")["quantization_config"]
    assert config["modules_to_not_convert"] == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    tensors = SafetensorsFolder(out)
    assert "model.layers.0.mlp.down_proj.weight" in tensors
    assert "model.layers.0.mlp.down_proj.qweight" not in tensors
    assert "model.layers.0.mlp.up_proj.qweight" in tensors


def test_converts_to_compressed_tensors_with_identical_weights(llama_run, tmp_path):
    """compressed-tensors' own AutoAWQ converter reads our AWQ file; its output dequantizes to
    the same weights, packs to the same integers as our compressed-tensors writer, and loads in
    transformers with the same logits."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from transformers import AutoModelForCausalLM

    awq = write_awq_gemm(llama_run, tmp_path / "awq")
    converted = tmp_path / "converted"
    convert_checkpoint(str(awq), str(converted), AutoAWQConverter.from_pretrained(str(awq)))
    ours = write_compressed_tensors(llama_run, tmp_path / "ct")

    awq_state, _ = read_output(awq)
    converted_state, _ = read_output(converted)
    assert sorted(converted_state) == sorted(awq_state)
    for name, tensor in awq_state.items():
        assert torch.equal(converted_state[name].float(), tensor.float()), name

    theirs, mine = SafetensorsFolder(converted), SafetensorsFolder(ours)
    for name in mine.names():
        if name.endswith(("weight_packed", "weight_zero_point", "weight_shape")):
            assert torch.equal(theirs.get(name), mine.get(name)), name
        elif name.endswith("weight_scale"):  # AWQ scales are float16, ours the model's dtype
            assert torch.equal(theirs.get(name).float(), mine.get(name).float()), name

    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    reference = model_from_state(llama_run.source_dir, awq_state)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_rel(model(ids).logits, reference(ids).logits)


# ---------------------------------------------------------------- real consumer: transformers

BF16_AWQ_KERNELS = {"TorchFusedAwqLinear", "TorchCpuAvx512AwqLinear"}

CONSUMER = r"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
results = {}
for path in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    weights, kernels = {}, set()
    for name, module in model.named_modules():
        if hasattr(module, "awq_weight_dequantize"):  # before forward: kernels repack on use
            w = module.awq_weight_dequantize(device="cpu", dtype=torch.float32)
            weights[name] = w.T.contiguous()
            kernels.add(type(module).__name__)
    with torch.no_grad():
        logits = model(ids).logits.float()
    results[path] = {"logits": logits, "weights": weights, "kernels": sorted(kernels)}
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="session")
def gptqmodel_dir() -> Path:
    """GPTQModel and its few pure-Python imports, installed with --no-deps outside
    site-packages (its metadata asks for torch>=2.14.1; we pin 2.13.0)."""
    default = Path.home() / ".cache" / "llmquant" / f"gptqmodel-{GPTQMODEL_VERSION}"
    folder = Path(os.environ.get("LLMQUANT_GPTQMODEL_DIR", default))
    if not (folder / "gptqmodel").is_dir():
        pytest.fail(
            f"GPTQModel is not installed in {folder}; run: pip install --no-deps "
            f"--target {folder} gptqmodel=={GPTQMODEL_VERSION} pypcre==0.6.4 logbar==0.4.15 "
            "threadpoolctl==3.8.0 device-smi==0.5.7 tokenicer==0.0.14 defuser==0.0.28 "
            "pillow==13.0.0"
        )
    return folder


def test_transformers_gptqmodel_loads_our_checkpoints(gptqmodel_dir, tmp_path):
    """transformers + GPTQModel load the files. AutoAWQ dequantizes in float16 (its scales'
    dtype), so the reference model holds our weights rounded to float16."""
    cases = {}
    for arch, group, ignore in [
        ("llama", 32, ["lm_head"]),
        ("qwen2", 64, ["lm_head"]),
        ("llama", 128, ["lm_head", "re:.*layers\\.1\\.mlp"]),  # 3 linears stay float
        ("qwen2", -1, ["lm_head"]),
    ]:
        source = tmp_path / f"source_{arch}"
        if not source.exists():
            make_source(source, arch)
        grid_for = unless_ignored(IntGrid(4, group, False), ignore)
        run = make_run(source, tmp_path / f"blocks_{arch}_{group}", grid_for)
        out = write_awq_gemm(run, tmp_path / f"awq_{arch}_{group}")
        cases[(arch, group)] = (source, out, 14 if len(ignore) == 1 else 11)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, PYTHONPATH=str(gptqmodel_dir))
    paths = [str(out) for _, out, _ in cases.values()]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CONSUMER,
            str(tmp_path / "ids.pt"),
            str(tmp_path / "res.pt"),
            *paths,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "res.pt")
    for (arch, group), (source, out, n_packed) in cases.items():
        result = results[str(out)]
        state, _ = read_output(out)
        assert len(result["weights"]) == n_packed, (arch, group)
        for module, weight in result["weights"].items():
            assert torch.equal(weight, state[f"{module}.weight"].half().float()), module
        packed = {f"{module}.weight" for module in result["weights"]}
        rounded = {k: v.half().float() if k in packed else v for k, v in state.items()}
        with torch.no_grad():
            expected = model_from_state(source, rounded)(ids).logits
        if result["kernels"] == ["TorchAtenAwqLinear"]:  # float32 activations, dense dequant
            assert_close_rel(result["logits"], expected, 1e-5)
        else:
            # Per-channel picks a bfloat16 kernel: TorchFusedAwqLinear, or on CPUs with
            # AVX512-BF16 TorchCpuAvx512AwqLinear.
            assert len(result["kernels"]) == 1, result["kernels"]
            assert result["kernels"][0] in BF16_AWQ_KERNELS, result["kernels"]
            assert_close_rel(result["logits"], expected, 2e-2)
