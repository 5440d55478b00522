"""Our GGML quantizers produce llama.cpp's bytes, with and without an importance matrix.

A random 2-layer llama (rows of 256 and 512, Student-t weights with all-zero, -0.0, constant,
outlier and tiny blocks injected) is written as F32 GGUF; ``llama-quantize --pure`` turns it
into each type, once plain and once with an imatrix file we write; every quantized tensor must
equal our ``quantize`` of the F32 tensor byte for byte. A second test calls ggml's quantizer
(``ggml_quantize_chunk``, what llama-quantize runs per tensor) directly on more random rows.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from llamacpp_fixtures import ggml_quantize, require_llamacpp

from llmquant.evaluate import llamacpp_tools as lct
from llmquant.quant.ggml import GGML_TYPES, get_ggml_type

pytestmark = [pytest.mark.llamacpp, pytest.mark.usefixtures("one_torch_thread")]

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 300
# llama-quantize's file-type name whose --pure output is all of one GGML type.
FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
QUANTIZED = [name for name, t in GGML_TYPES.items() if t.block_size > 1] + ["F16", "BF16"]


def student_t(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    w = (rng.standard_t(3, size=(rows, cols)) * 0.02).astype(np.float32)
    w[0, :256] = 0.0
    w[1, :256] = -0.0
    w[2, :256] = 0.03
    w[3, :256] = 0.0
    w[3, 17] = -2.0
    w[4, :256] *= 1e-7
    w[5, 40] = 25.0
    w[6, :256] = np.abs(w[6, :256])
    return w


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """SPM-style: <unk> <s> </s>, 256 byte tokens, then plain pieces (llamacpp.md §2a)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259)
    return tokens, [0.0] * 3 + [-1.0] * (VOCAB - 3), types


def write_model(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    tensors = {"token_embd.weight": student_t(rng, VOCAB, HIDDEN)}
    for i in range(LAYERS):
        shapes = {
            "attn_q": (HIDDEN, HIDDEN),
            "attn_k": (KV_HEADS * head_dim, HIDDEN),
            "attn_v": (KV_HEADS * head_dim, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN),
            "ffn_gate": (FFN, HIDDEN),
            "ffn_up": (FFN, HIDDEN),
            "ffn_down": (HIDDEN, FFN),
        }
        for name, shape in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = student_t(rng, *shape)
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    tensors["output_norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    tensors["output.weight"] = student_t(rng, VOCAB, HIDDEN)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def write_imatrix(path: Path, importance: dict[str, np.ndarray], tokens: int) -> None:
    """An imatrix GGUF as llama-imatrix writes it: ``<name>.in_sum2`` and ``<name>.counts``."""
    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_array(gguf.Keys.IMatrix.DATASETS, ["random"])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 1)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, tokens)
    for name, mean_sq in importance.items():
        writer.add_tensor(f"{name}.in_sum2", (mean_sq * np.float32(tokens))[None, :])
        writer.add_tensor(f"{name}.counts", np.full((1, 1), tokens, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tools() -> lct.LlamaCppTools:
    return require_llamacpp()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], Path, dict[str, np.ndarray]]:
    """(F32 model, its tensors, imatrix file, importance per tensor as llama-quantize reads it)."""
    root = tmp_path_factory.mktemp("ggml")
    tensors = write_model(root / "f32.gguf")
    rng = np.random.default_rng(1)
    tokens = 96
    stored = {
        name: (rng.lognormal(-3, 1.5, array.shape[1]) * tokens).astype(np.float32) / tokens
        for name, array in tensors.items()
        if array.ndim == 2 and name != "token_embd.weight"  # llama-imatrix never sees embeddings
    }
    write_imatrix(root / "imatrix.gguf", stored, tokens)
    # llama-quantize divides the stored sums by the count in float32.
    importance = {
        name: (mean_sq * np.float32(tokens)).astype(np.float32) / np.float32(tokens)
        for name, mean_sq in stored.items()
    }
    return root / "f32.gguf", tensors, root / "imatrix.gguf", importance


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", QUANTIZED)
def test_bytes_equal_llama_quantize(tools, model, tmp_path: Path, name, with_imatrix):
    f32_path, tensors, imatrix_path, importance = model
    args = ["--pure"] + (["--imatrix", imatrix_path] if with_imatrix else [])
    out = tmp_path / f"{name}.gguf"
    tools.run("llama-quantize", *args, f32_path, out, FTYPE.get(name, name), "1")
    ggml_type = get_ggml_type(name)
    compared, differing = 0, []
    for tensor in gguf.GGUFReader(out).tensors:
        if tensor.tensor_type != ggml_type.type_id:
            continue
        weights = torch.from_numpy(tensors[tensor.name])
        qw = importance.get(tensor.name) if with_imatrix else None
        ours = ggml_type.quantize(weights, None if qw is None else torch.from_numpy(qw))
        theirs = np.asarray(tensor.data).view(np.uint8).reshape(ours.shape)
        compared += 1
        if not np.array_equal(ours, theirs):
            blocks = ours.reshape(-1, ggml_type.type_size) != theirs.reshape(
                -1, ggml_type.type_size
            )
            differing.append(f"{tensor.name}: {int(blocks.any(1).sum())} blocks")
    assert compared == 2 + 7 * LAYERS, f"llama-quantize wrote {compared} {name} tensors"
    assert not differing, f"{name}: {len(differing)}/{compared} tensors differ: {differing}"


@pytest.mark.parametrize("name", [name for name in QUANTIZED if name not in ("F16", "BF16")])
def test_bytes_equal_ggml_quantize_chunk(tools, name: str):
    rng = np.random.default_rng(2)
    weights = student_t(rng, 48, 1024)
    weights[7] *= 300.0  # large values
    importance = rng.lognormal(-2, 2, 1024).astype(np.float32)
    importance[:64] = 0.0  # channels never activated
    ggml_type = get_ggml_type(name)
    for qw in (None, importance):
        theirs = ggml_quantize(weights, ggml_type.type_id, qw, root=tools.root)
        ours = ggml_type.quantize(
            torch.from_numpy(weights), None if qw is None else torch.from_numpy(qw)
        )
        blocks = ours.reshape(-1, ggml_type.type_size) != theirs.reshape(-1, ggml_type.type_size)
        assert not blocks.any(), (
            f"{name} importance={qw is not None}: {int(blocks.any(1).sum())} blocks differ"
        )
