"""Our GGUF files run in llama.cpp: logits against transformers, generation, perplexity.

- F32 export of tiny random Llama / Qwen2 models: llama.cpp's logits equal transformers' to 1e-4
  relative, and llama.cpp tokenizes text as the Hugging Face tokenizer does.
- Q8_0 / Q4_0 exports: close to transformers running the dequantized weights (llama.cpp also
  quantizes activations to Q8 for these matmuls, so equality is not expected).
- SmolLM2-135M exported to Q4_K_M: llama-completion says " Paris" after "The capital of France
  is"; (e2e) llama-perplexity of the Q4_K_M file is close to the F32 export's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import llamacpp_fixtures
import numpy as np
import pytest
import torch
from test_gguf_writer import TEXT, make_model, read_back
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmquant.export.gguf.names import TensorMapper
from llmquant.export.gguf.writer import write_gguf
from llmquant.tensors import SafetensorsFolder

# pytest fixtures (until conftest.py imports them for every module)
llamacpp_logits = llamacpp_fixtures.llamacpp_logits
llamacpp_tokenize = llamacpp_fixtures.llamacpp_tokenize
llamacpp_tools = llamacpp_fixtures.llamacpp_tools

pytestmark = pytest.mark.llamacpp


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def random_ids(vocab: int, n: int = 96, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def dequantized_model(src: Path, gguf_path: Path):
    """transformers model of ``src`` holding the weights read back (dequantized) from the file."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    config = json.loads((src / "config.json").read_text())
    mapper = TensorMapper(config)
    _, values = read_back(gguf_path)
    state = {}
    for name in model.state_dict():
        gname = mapper.gguf_name(name)
        if gname is None:
            continue
        state[name] = mapper.unconvert(name, values[gname])
    if "lm_head.weight" not in state and not config.get("tie_word_embeddings"):
        raise AssertionError("untied model without output.weight")
    model.load_state_dict(state, strict=False)
    return model


@pytest.mark.parametrize(
    "arch,tie",
    [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False), ("gemma2", True),
     ("gemma3", True)],
)  # fmt: skip
def test_f32_logits_equal_transformers(llamacpp_logits, tmp_path: Path, arch: str, tie: bool):
    src = make_model(tmp_path / "hf", arch=arch, tie=tie, hidden=128, ffn=256, heads=4,
                     kv_heads=2)  # fmt: skip
    out = write_gguf(src, SafetensorsFolder(src), tmp_path / "m.gguf", "F32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = random_ids(model.config.vocab_size)
    ref = hf_logits(model, ids)
    got = llamacpp_logits(out, ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    # ggml's CPU GELU (Gemma's activation) reads an fp16 lookup table (GGML_GELU_FP16 in
    # ggml-cpu/vec.h), about 1e-3 relative per activation: measured 5.7e-4 / 7.7e-4 here.
    bound = 2e-3 if arch.startswith("gemma") else 1e-4
    assert rel < bound, f"max |llama.cpp - transformers| / max |logit| = {rel:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() == 1.0


@pytest.mark.parametrize("tokenizer", ["gpt2-bpe", "llama-json", "spm"])
def test_llamacpp_tokenizes_like_hf(llamacpp_tokenize, tmp_path: Path, tokenizer: str):
    src = make_model(tmp_path / "hf", tokenizer=tokenizer)
    path = write_gguf(src, SafetensorsFolder(src), tmp_path / "m.gguf", "F32", progress=False)
    if tokenizer == "spm":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        encode = lambda text: [1, *sp.encode(text)]  # noqa: E731 (BOS first, as configured)
    else:
        tok = AutoTokenizer.from_pretrained(src)
        encode = lambda text: tok(text)["input_ids"]  # noqa: E731
    for text in (TEXT[:300], "Unseen wörds,  double  spaces and ✅ emoji: 12345!", "Paris"):
        assert llamacpp_tokenize(path, text) == encode(text), text


# llama.cpp's CPU matmul for Q8_0/Q4_0 weights also quantizes the activations to Q8_0, so even
# Q8_0 is not equal to torch on the dequantized weights. Measured on this random model (hidden
# 256): max error 6.8e-2 / 6.2e-2 of the largest logit, correlation 0.99915 / 0.99916; the
# bounds leave room of about 2x. A wrong layout (unpermuted q/k, shifted blocks) gives errors of
# order 1 (llamacpp.md: correlation far below 0.9 without the permutation).
TOLERANCE = {"Q8_0": (0.15, 0.998), "Q4_0": (0.15, 0.998)}


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0"])
def test_quantized_close_to_dequantized_torch(llamacpp_logits, tmp_path: Path, mix: str):
    src = make_model(tmp_path / "hf", hidden=256, ffn=512, heads=4, kv_heads=2)
    out = write_gguf(src, SafetensorsFolder(src), tmp_path / "m.gguf", mix, progress=False)
    model = dequantized_model(src, out)
    ids = random_ids(model.config.vocab_size)
    ref = hf_logits(model, ids)
    got = llamacpp_logits(out, ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    max_rel, min_corr = TOLERANCE[mix]
    print(f"{mix}: max rel error {rel:.3e}, correlation {corr:.6f}")
    assert rel < max_rel and corr > min_corr, (rel, corr)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


# --- SmolLM2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_hf() -> Path:
    from llmquant.model.source import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="module")
def smol_q4_k_m(smol_hf: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "smollm2-q4_k_m.gguf"
    return write_gguf(smol_hf, SafetensorsFolder(smol_hf), out, "Q4_K_M", progress=False)


@pytest.mark.e2e  # exporting SmolLM2 to Q4_K_M takes minutes (K-quant fitting in torch)
def test_smollm2_q4_k_m_says_paris(llamacpp_tools, smol_q4_k_m: Path):
    proc = subprocess.run(
        [str(llamacpp_tools.bin / "llama-completion"), "-m", str(smol_q4_k_m),
         "-p", "The capital of France is", "-n", "8", "-t", "2", "--temp", "0", "-no-cnv",
         "--no-warmup"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The capital of France is Paris" in proc.stdout, proc.stdout


def _perplexity(tools, model: Path, text: Path) -> float:
    return llamacpp_fixtures.llama_perplexity(
        tools, "-m", model, "-f", text, "-c", 256, "--chunks", 4, "-t", 2, "-b", 256
    )


@pytest.fixture(scope="module")
def smol_f32(smol_hf: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf"
    return write_gguf(smol_hf, SafetensorsFolder(smol_hf), out, "F32", progress=False)


@pytest.mark.e2e
def test_smollm2_q4_k_m_bytes_equal_llama_quantize(llamacpp_tools, smol_f32, smol_q4_k_m, tmp_path):
    """Our Q4_K_M file == llama-quantize's Q4_K_M of our F32 file: every type and every byte."""
    import gguf

    theirs = tmp_path / "theirs.gguf"
    llamacpp_tools.run("llama-quantize", smol_f32, theirs, "Q4_K_M", "2")
    a = {t.name: t for t in gguf.GGUFReader(smol_q4_k_m).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name


@pytest.mark.e2e
def test_smollm2_q4_k_m_perplexity_close_to_f32(llamacpp_tools, smol_f32, smol_q4_k_m, tmp_path):
    from llmquant.data.text import load_documents

    f32 = smol_f32
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(load_documents("default")[-200:]))
    ppl_f32 = _perplexity(llamacpp_tools, f32, text)
    ppl_q = _perplexity(llamacpp_tools, smol_q4_k_m, text)
    print(f"SmolLM2 llama-perplexity 4x256: F32 {ppl_f32:.4f}, Q4_K_M {ppl_q:.4f}")
    # Measured: F32 14.763, Q4_K_M 16.013 (+8.5 %; the file is byte-identical to
    # llama-quantize's, so this is llama.cpp's own Q4_K_M loss on this small model).
    assert ppl_f32 < ppl_q < ppl_f32 * 1.15


@pytest.mark.e2e
def test_smollm2_q4_k_m_llamacpp_perplexity_close_to_torch(llamacpp_tools, smol_hf, smol_q4_k_m):
    """llama.cpp running our Q4_K_M file and torch running the weights dequantized from that
    file score the same tokens almost alike (llama.cpp also rounds activations to Q8_K)."""
    from llmquant.data.text import load_documents, make_windows
    from llmquant.evaluate.loaders import LlamaCppRunner, open_streamed
    from llmquant.evaluate.perplexity import perplexity_from_hidden, token_nll
    from llmquant.evaluate.streamed import final_hidden

    tokenizer = AutoTokenizer.from_pretrained(smol_hf)
    windows = make_windows(tokenizer, load_documents("default")[-200:], 3, 256)  # [3, 256]
    streamed, kind = open_streamed(smol_q4_k_m)
    assert kind == "gguf-dequantized"
    in_torch = perplexity_from_hidden(streamed.logits, final_hidden(streamed, windows), windows)
    runner = LlamaCppRunner(smol_q4_k_m, n_ctx=256)
    try:
        nll = [token_nll(logits, row) for logits, row in
               zip(runner.window_logits(windows), windows.split(1))]  # fmt: skip
    finally:
        runner.close()
    in_llamacpp = float(torch.cat(nll, dim=1).mean().exp())
    print(f"SmolLM2 Q4_K_M 3x256: torch {in_torch.ppl:.4f}, llama.cpp {in_llamacpp:.4f}")
    # Measured: torch 19.040, llama.cpp 19.199 (+0.8 %).
    assert in_llamacpp == pytest.approx(in_torch.ppl, rel=0.015)


@pytest.mark.e2e
def test_smollm2_f32_export_equals_llama_cpp_f32(llamacpp_tools, smol_f32, tmp_path):
    """Our F32 file from the dequantized HF folder == llama-quantize's F32 of the original file:
    every tensor bit for bit (names, q/k permutation) and the llama/tokenizer metadata."""
    import gguf
    from test_gguf_mixes import smollm2_gguf

    ours = smol_f32
    theirs = tmp_path / "theirs.gguf"
    llamacpp_tools.run("llama-quantize", "--allow-requantize", smollm2_gguf(), theirs, "F32", "2")
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in ta.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), name
    # general.* (name, license...) differ by design; SmolLM2's original HF tokenizer_config set
    # add_prefix_space, which the folder converted from the GGUF no longer has (BPE ignores it)
    skip = ("general.", "GGUF.", "tokenizer.ggml.add_space_prefix")
    keys = [k for k in b.fields if not k.startswith(skip)]
    for key in keys:
        assert key in a.fields, key
        assert a.fields[key].contents() == b.fields[key].contents(), key
