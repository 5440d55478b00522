"""compressed-tensors pack-quantized export: bit layout against the library, and transformers
(with the compressed-tensors package) as the real consumer."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from export_fixtures import (
    assert_close_rel,
    logits,
    make_run,
    make_source,
    model_from_state,
    read_json,
    reference_model,
)
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from llmquant.errors import InputError
from llmquant.export import compressed_tensors as ct
from llmquant.export.compressed_tensors import write_compressed_tensors
from llmquant.formats import detect_format, open_output
from llmquant.quant.grid import IntGrid
from llmquant.quant.plan import is_ignored
from llmquant.tensors import INDEX_FILE, SafetensorsFolder, load_all


def naive_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Looped reference: element j of a row at bit j*bits of the row's int32 stream."""
    rows, cols = values.shape
    per_word = 32 // bits
    out = torch.zeros(rows, math.ceil(cols / per_word), dtype=torch.int32)
    for r in range(rows):
        for w in range(out.shape[1]):
            word = 0
            for k in range(per_word):
                j = w * per_word + k
                if j < cols:
                    word |= int(values[r, j]) << (bits * k)
            out[r, w] = word - (1 << 32) if word >= 1 << 31 else word
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,cols", [(1, 8), (3, 12), (7, 64), (16, 33), (2, 256)])
def test_pack_matches_naive_packer_and_library(bits, rows, cols):
    gen = torch.Generator().manual_seed(bits * 10_000 + rows * 100 + cols)
    values = torch.randint(0, 2**bits, (rows, cols), generator=gen)
    values[0, -1] = 2**bits - 1  # top bit of the last word
    packed = ct.pack_rows(values, bits)
    assert torch.equal(packed, naive_pack(values, bits))
    assert torch.equal(ct.unpack_rows(packed, bits, cols), values.to(torch.int16))
    signed = (values - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(packed, pack_to_int32(signed, bits))
    # Zero points are packed along the output dimension (dim 0).
    assert torch.equal(ct.pack_rows(values.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([rows, cols])), signed)


def read_dequantized(path) -> dict[str, torch.Tensor]:
    """The plain state dict of an output (packed linears dequantized), via the format registry."""
    source, kind = open_output(path)
    assert kind == "compressed-tensors"
    return load_all(source)


def load_compressed(path):
    """The default (compressed) load path of transformers 5.23 with compressed-tensors."""
    try:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    except RuntimeError as err:
        version = importlib.metadata.version("compressed-tensors")
        raise AssertionError(
            f"transformers could not load {path} with compressed-tensors {version}; versions "
            "0.18.0+ leave weight_zero_point unpacked on the meta device, so asymmetric "
            f"checkpoints fail under transformers 5.23: pin compressed-tensors==0.17.1 ({err})"
        ) from err


GRIDS = {
    "int4-g32-sym": IntGrid(4, 32, symmetric=True),
    "int4-g32-asym": IntGrid(4, 32, symmetric=False),
    "int4-channel-asym": IntGrid(4, -1, symmetric=False),
    "int8-g64-asym": IntGrid(8, 64, symmetric=False),
    "int8-channel-sym": IntGrid(8, -1, symmetric=True),
    "int8-channel-asym": IntGrid(8, -1, symmetric=False),
    "int4-channel-sym": IntGrid(4, -1, symmetric=True),
    "int8-g32-sym": IntGrid(8, 32, symmetric=True),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct_sources")
    return {
        "llama": make_source(root / "llama", "llama"),
        "qwen2": make_source(root / "qwen2", "qwen2", tie=True),
    }


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_transformers_loads_with_equal_logits(sources, tmp_path, name):
    """transformers + compressed-tensors (default compressed load and dequantize=True) give the
    logits of llmquant's own dequantized model."""
    grid = GRIDS[name]
    arch = "qwen2" if grid.bits == 8 else "llama"  # Qwen2 brings q/k/v biases and tied lm_head
    run = make_run(sources[arch], tmp_path / "blocks", grid)
    out = write_compressed_tensors(run, tmp_path / "ct")
    expected = logits(reference_model(run))

    state = read_dequantized(out)
    assert_close_rel(logits(model_from_state(run.source_dir, state)), expected, 0.0)

    assert_close_rel(logits(load_compressed(out)), expected, 1e-5)
    dequantized = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    assert_close_rel(logits(dequantized), expected, 1e-5)


def test_layout_and_config(sources, tmp_path):
    run = make_run(sources["llama"], tmp_path / "blocks", IntGrid(4, 32, symmetric=False))
    out = write_compressed_tensors(run, tmp_path / "ct")
    assert detect_format(out) == "compressed-tensors"
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    weights = group["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (4, "int", False)
    assert (weights["strategy"], weights["group_size"]) == ("group", 32)

    tensors = SafetensorsFolder(out)
    block = run.block(1)
    for module, linear in block.linears.items():
        out_f, in_f = linear.weight.shape
        codes = linear.codes
        packed = tensors.get(f"{module}.weight_packed")
        assert (packed.dtype, tuple(packed.shape)) == (torch.int32, (out_f, in_f // 8))
        scale = tensors.get(f"{module}.weight_scale")
        assert (scale.dtype, tuple(scale.shape)) == (torch.float32, (out_f, in_f // 32))
        zp = tensors.get(f"{module}.weight_zero_point")
        assert (zp.dtype, tuple(zp.shape)) == (torch.int32, (out_f // 8, in_f // 32))
        shape = tensors.get(f"{module}.weight_shape")
        assert shape.tolist() == [out_f, in_f]
        # Stored values are compressed-tensors' signed codes + 2^(b-1), i.e. our unsigned codes.
        assert torch.equal(packed, naive_pack(codes.codes, 4))
        assert torch.equal(zp, naive_pack(codes.zeros.T, 4).T)
        assert torch.equal(scale, codes.scales)
        assert f"{module}.weight" not in tensors
    assert tensors.get("model.layers.1.input_layernorm.weight").dtype == torch.float32


def test_mixed_grids_ignore_and_shards(sources, tmp_path):
    """Per-module grids become one config group each; ignored linears stay float; small shards
    give an index that transformers follows."""

    def grid_for(module: str) -> IntGrid | None:
        if module.endswith("o_proj"):
            return None  # never quantized: must land in `ignore`
        if is_ignored(module, ["lm_head", "re:model\\.layers\\.1\\.mlp\\.up"]):
            return None  # left out of the plan, as a recipe's `ignore` does
        if module.endswith("down_proj"):
            return IntGrid(8, -1, symmetric=True)
        return IntGrid(4, 32, symmetric=False)

    run = make_run(sources["qwen2"], tmp_path / "blocks", grid_for)
    out = write_compressed_tensors(run, tmp_path / "ct", max_shard_bytes=80_000)
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc["ignore"] == [
        "lm_head",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    targets = sorted(sorted(g["targets"]) for g in qc["config_groups"].values())
    assert ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"] in targets
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = read_json(out / INDEX_FILE)
    assert set(index["weight_map"].values()) == set(files)

    expected = logits(reference_model(run))
    state = read_dequantized(out)
    assert_close_rel(logits(model_from_state(run.source_dir, state)), expected, 0.0)
    assert_close_rel(logits(load_compressed(out)), expected, 1e-5)


def test_float16_source_keeps_its_dtype(tmp_path):
    source = make_source(tmp_path / "source", "llama", dtype=torch.float16)
    run = make_run(source, tmp_path / "blocks", IntGrid(4, 64, symmetric=True))
    out = write_compressed_tensors(run, tmp_path / "ct")
    tensors = SafetensorsFolder(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert tensors.get(name).dtype == torch.float16, name
    assert tensors.get("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float16
    state = read_dequantized(out)
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(state[weight].half(), run.block(0).tensors[weight])


def test_unsupported_grid_fails_cleanly(sources, tmp_path):
    run = make_run(sources["llama"], tmp_path / "blocks", IntGrid(2, 32, symmetric=False))
    with pytest.raises(ValueError, match="bits=2"):
        write_compressed_tensors(run, tmp_path / "out" / "ct")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_scales_must_be_exact_in_the_model_dtype(tmp_path):
    source = make_source(tmp_path / "source", "llama", dtype=torch.bfloat16)
    run = make_run(source, tmp_path / "blocks", IntGrid(4, 32, symmetric=True))
    with pytest.raises(ValueError, match="scale_dtype"):
        write_compressed_tensors(run, tmp_path / "ct")
    run = make_run(
        source, tmp_path / "blocks_bf16", IntGrid(4, 32, True, scale_dtype=torch.bfloat16)
    )
    out = write_compressed_tensors(run, tmp_path / "ct")
    scale = SafetensorsFolder(out).get("model.layers.0.self_attn.q_proj.weight_scale")
    assert scale.dtype == torch.bfloat16


def test_detect_format(sources, tmp_path):
    assert detect_format(sources["llama"]) == "hf"
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(20))
    assert detect_format(gguf_file) == "gguf"
    with pytest.raises(InputError, match="no config.json"):
        detect_format(tmp_path)


def test_inspect_tool_summarises_outputs(sources, tmp_path):
    import subprocess
    import sys

    run = make_run(sources["llama"], tmp_path / "blocks", IntGrid(8, -1, symmetric=False))
    out = write_compressed_tensors(run, tmp_path / "ct")
    done = subprocess.run(
        [sys.executable, "tools/inspect_model.py", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "format:  compressed-tensors" in done.stdout
    assert "packed linears: 14 (int8 channel asym: 14)" in done.stdout
    assert "model.layers.1.mlp.down_proj.weight_packed" in done.stdout
    failed = subprocess.run(
        [sys.executable, "tools/inspect_model.py", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "no config.json" in failed.stderr


def test_streamed_shard_writer_writes_the_bytes_of_safetensors_save_file(tmp_path):
    """Our shard writer streams tensor by tensor; its files are byte for byte save_file's."""
    from safetensors.torch import save_file

    from llmquant.export.common import write_safetensors

    torch.manual_seed(0)
    tensors = {
        "model.layers.0.mlp.down_proj.qweight": torch.randint(-9, 9, (8, 4), dtype=torch.int32),
        "model.layers.0.mlp.down_proj.scales": torch.randn(8, 2).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.qzeros": torch.randint(0, 9, (8, 1), dtype=torch.int32),
        "a.norm": torch.randn(7),
        "b.half": torch.randn(3, 3).half(),
        "c.codes": torch.randint(0, 15, (5,), dtype=torch.uint8),
        "d.i16": torch.randint(0, 15, (3,), dtype=torch.int16),
        "e.i64": torch.arange(3),
        "f.bool": torch.tensor([True, False]),
        "g.empty": torch.zeros(0, 4),
        "h.i8": torch.tensor([-1, 2], dtype=torch.int8),
        "i.f64": torch.randn(2, dtype=torch.float64),
    }
    # One metadata key, as the exports write: save_file orders several keys by a hash map.
    metadata = {"format": "pt"}
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
    theirs = (tmp_path / "theirs.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == theirs
