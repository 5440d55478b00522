"""GGUF writer: round trips through gguf-py's GGUFReader on tiny random models.

Also holds the tiny-model fixtures the other GGUF test modules import (a random Llama/Qwen2 with
a real byte-level BPE tokenizer trained here with the ``tokenizers`` library).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from llmquant.export.gguf.names import TensorMapper, permute_rows, unpermute_rows
from llmquant.export.gguf.writer import write_gguf
from llmquant.tensors import SafetensorsFolder, load_all

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is "
    "the capital of Germany. Numbers like 1234 and 56.78 appear in text; so do quotes 'like this' "
    'and "that". The weather today is sunny with a chance of rain in the evening. '
    "Quantization maps floating point weights to a few bits per value. "
) * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma2": Gemma2Config,
    "gemma3": Gemma3TextConfig,
}


def make_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    """A GPT-2-style byte-level BPE tokenizer saved as a PreTrainedTokenizerFast; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )  # fmt: skip
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def make_llama_style_tokenizer(folder: Path) -> int:
    """A Llama-2-style tokenizer.json (BPE over "▁"-escaped text, byte fallback, BOS added)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    escape = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE())
    base.normalizer = escape
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    base.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, show_progress=False))
    trained = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for tok in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = escape
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    return tok.get_vocab_size()


def make_spm_tokenizer(folder: Path) -> int:
    """A SentencePiece BPE ``tokenizer.model`` normalized as Llama's: byte fallback, identity
    normalization, extra whitespace kept (SentencePiece's defaults NFKC + whitespace collapsing
    make its ids differ from llama.cpp's)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split(". ")), model_writer=model, vocab_size=340,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return sp.vocab_size()


TOKENIZERS = {
    "gpt2-bpe": make_tokenizer,
    "llama-json": make_llama_style_tokenizer,
    "spm": make_spm_tokenizer,
}


def make_model(
    folder: Path,
    arch: str = "llama",
    hidden: int = 64,
    ffn: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
    seed: int = 0,
    vocab_pad: int = 4,
    tokenizer: str = "gpt2-bpe",
) -> Path:
    """A random tiny causal LM with a tokenizer (``TOKENIZERS``), saved like a HF folder."""
    folder.mkdir(parents=True, exist_ok=True)
    n_tokens = TOKENIZERS[tokenizer](folder)
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=n_tokens + vocab_pad, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    )  # fmt: skip
    if arch in ("qwen3", "gemma2", "gemma3"):
        # head_dim set apart from hidden/heads, as these families do; Gemma's attention scale
        # 1/sqrt(query_pre_attn_scalar) is what llama.cpp uses (1/sqrt(head_dim)) when equal
        kwargs |= dict(head_dim=32, tie_word_embeddings=tie or arch != "qwen3")
    if arch.startswith("gemma"):
        kwargs |= dict(query_pre_attn_scalar=32, sliding_window=64, rope_theta=None)
        kwargs.pop("rope_theta")
    config = CONFIGS[arch](**kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                std = 1 / p.shape[1] ** 0.5
                # q/k twice as large: sharp attention makes rope/permutation mistakes visible
                if "q_proj" in name or "k_proj" in name:
                    std *= 2
                p.copy_(std * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


class DictTensors:
    """A tensor source held in memory (``llmquant.tensors.TensorSource``): {HF name: tensor}."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name] for name in names}


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_all(SafetensorsFolder(folder))


def read_back(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    """The file and each tensor dequantized to float32 in torch shape order."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(values, dtype=np.float32).reshape(tuple(reversed(t.shape)))
    return reader, out


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny_llama"))


def test_permutation_inverse_and_layout():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of 8 rows
    p = permute_rows(w, 4)
    assert torch.equal(unpermute_rows(p, 4), w)
    # head 0: HF rows 0..3 are the first rope halves, 4..7 the second; llama.cpp interleaves
    assert [int(r) // 3 for r in p[:8, 0]] == [0, 4, 1, 5, 2, 6, 3, 7]


def test_f32_round_trip(tiny_llama: Path, tmp_path: Path):
    out = write_gguf(tiny_llama, SafetensorsFolder(tiny_llama), tmp_path / "m.gguf", "F32",
                     progress=False)  # fmt: skip
    reader, got = read_back(out)
    config = json.loads((tiny_llama / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.embedding_length") == 64
    assert field(reader, "llama.feed_forward_length") == 128
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.dimension_count") == 16
    assert field(reader, "llama.context_length") == 256
    assert field(reader, "llama.vocab_size") == config["vocab_size"]
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(reader, "general.quantization_version") == 2
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"  # unknown hash, plain byte-level BPE
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert tokens[:3] == SPECIALS
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # CONTROL, NORMAL
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")

    state = hf_state(tiny_llama)
    mapper = TensorMapper(config)
    assert len(got) == len(state) == 2 * 9 + 3
    for hf_name, value in state.items():
        gname = mapper.gguf_name(hf_name)
        assert got[gname].shape == tuple(value.shape), gname
        back = mapper.unconvert(hf_name, got[gname])
        assert torch.equal(back, value), hf_name  # F32: exact after undoing the permutation
    # q really is permuted on disk (not stored in HF order)
    hf_q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(got["blk.0.attn_q.weight"], hf_q)
    for t in reader.tensors:
        expect = gguf.GGMLQuantizationType.F32
        assert t.tensor_type == expect and t.data_offset % 32 == 0


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0"])
def test_quantized_values_match_gguf_py(tiny_llama: Path, tmp_path: Path, mix: str):
    """Legacy quants: bytes equal gguf-py's reference quantizer on the permuted weights."""
    out = write_gguf(tiny_llama, SafetensorsFolder(tiny_llama), tmp_path / "m.gguf", mix,
                     progress=False)  # fmt: skip
    reader = gguf.GGUFReader(out)
    config = json.loads((tiny_llama / "config.json").read_text())
    mapper = TensorMapper(config)
    state = {mapper.gguf_name(n): (n, t) for n, t in hf_state(tiny_llama).items()}
    qtype = gguf.GGMLQuantizationType[mix]
    for t in reader.tensors:
        hf_name, value = state[t.name]
        if value.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        # llama.cpp gives output.weight Q6_K, which falls back to Q8_0 for 64-wide rows
        expect = gguf.GGMLQuantizationType.Q8_0 if t.name == "output.weight" else qtype
        assert t.tensor_type == expect, t.name
        ref = gguf.quants.quantize(mapper.convert(hf_name, value).numpy(), expect)
        assert np.array_equal(np.asarray(t.data).reshape(ref.shape), ref), t.name


@pytest.mark.parametrize("mix", ["IQ4_XS", "IQ4_NL"])
def test_iq4_mix_file(tmp_path: Path, mix: str):
    """An IQ4 file type on 256-wide rows: general.file_type, llama.cpp's types, our bytes of
    the permuted weights in each tensor, and gguf-py reads every tensor back."""
    from llmquant.quant.ggml import get_ggml_type

    src = make_model(tmp_path / "hf", hidden=256, ffn=512, layers=1, heads=4, kv_heads=4)
    out = write_gguf(src, SafetensorsFolder(src), tmp_path / "m.gguf", mix, progress=False)
    reader, values = read_back(out)
    assert field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{mix}"]
    mapper = TensorMapper(json.loads((src / "config.json").read_text()))
    state = {mapper.gguf_name(n): (n, t) for n, t in hf_state(src).items()}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q6_K" and types["blk.0.ffn_up.weight"] == mix
    assert types["blk.0.attn_v.weight"] == mix  # no GQA: no Q5_K bump
    for t in reader.tensors:
        hf_name, value = state[t.name]
        if value.dim() == 2:
            ours = get_ggml_type(types[t.name]).quantize(mapper.convert(hf_name, value).float())
            assert np.array_equal(np.asarray(t.data).reshape(ours.shape), ours), t.name
        assert np.isfinite(values[t.name]).all(), t.name


def test_qwen2_biases_tied_and_no_permutation(tmp_path: Path):
    src = make_model(tmp_path / "qwen", arch="qwen2", tie=True)
    out = write_gguf(src, SafetensorsFolder(src), tmp_path / "q.gguf", "F32", progress=False)
    reader, got = read_back(out)
    assert field(reader, "general.architecture") == "qwen2"
    assert "output.weight" not in got  # tied: llama.cpp reuses token_embd
    state = hf_state(src)
    for name in ("q_proj", "k_proj", "v_proj"):
        for suffix in ("weight", "bias"):
            hf = state[f"model.layers.1.self_attn.{name}.{suffix}"]
            gname = f"blk.1.attn_{name[0]}.{suffix}"
            assert np.array_equal(got[gname], hf.numpy()), gname  # qwen2: no row permutation


def test_llama_permutes_biases(tmp_path: Path):
    src = make_model(tmp_path / "biased", heads=4, kv_heads=2)
    config = json.loads((src / "config.json").read_text())
    config["attention_bias"] = True
    bias = torch.arange(64, dtype=torch.float32)
    tensors = hf_state(src)
    tensors["model.layers.0.self_attn.q_proj.bias"] = bias
    tensors["model.layers.0.self_attn.k_proj.bias"] = bias[:32]
    out = write_gguf(src, DictTensors(tensors), tmp_path / "b.gguf", "F32", progress=False)
    _, got = read_back(out)
    assert np.array_equal(got["blk.0.attn_q.bias"], permute_rows(bias, 4).numpy())
    assert np.array_equal(got["blk.0.attn_k.bias"], permute_rows(bias[:32], 2).numpy())


def test_types_override_and_checks(tiny_llama: Path, tmp_path: Path):
    source = SafetensorsFolder(tiny_llama)
    # only 2-D tensors take an override: the norm stays F32
    overrides = {"blk.0.ffn_down.weight": "Q8_0", "blk.0.attn_norm.weight": "Q8_0"}
    out = write_gguf(tiny_llama, source, tmp_path / "o.gguf", "F16", overrides, progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"

    mapper = TensorMapper(json.loads((tiny_llama / "config.json").read_text()))
    matrices = {mapper.gguf_name(n): "Q4_K" for n in source.names() if len(source.shape(n)) == 2}
    with pytest.raises(ValueError, match="block size"):
        write_gguf(tiny_llama, source, tmp_path / "x.gguf", "F32", matrices, progress=False)
    with pytest.raises(ValueError, match=r"blk\.9\.ffn_down\.weight, which is not a tensor"):
        write_gguf(tiny_llama, source, tmp_path / "y.gguf", "F32",
                   {"blk.9.ffn_down.weight": "Q8_0"}, progress=False)  # fmt: skip
    for bad in ("Q9", "IQ2_XXS"):  # unknown, and known to gguf but not written by llmquant
        with pytest.raises(ValueError, match=rf"blk\.0\.ffn_down\.weight: type '{bad}'"):
            write_gguf(tiny_llama, source, tmp_path / "w.gguf", "F32",
                       {"blk.0.ffn_down.weight": bad}, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="unknown GGUF mix"):
        write_gguf(tiny_llama, source, tmp_path / "z.gguf", "Q9_X")
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "x.gguf").exists()


def test_run_tensors_source(tmp_path: Path):
    """A run folder's tensors (block files + source folder) stream into the same file layout."""
    from export_fixtures import make_run

    from llmquant.quant.grid import IntGrid

    src = make_model(tmp_path / "src")
    run = make_run(src, tmp_path / "blocks", IntGrid(bits=4, group_size=32, symmetric=False))
    out = write_gguf(src, run.tensors(), tmp_path / "r.gguf", "F32", progress=False)
    _, got = read_back(out)
    mapper = TensorMapper(json.loads((src / "config.json").read_text()))
    for block in run.iter_blocks():
        for name, value in block.tensors.items():
            back = mapper.unconvert(name, got[mapper.gguf_name(name)])
            assert torch.equal(back, value.float()), name
    embed = hf_state(src)["model.embed_tokens.weight"]
    assert np.array_equal(got["token_embd.weight"], embed.numpy())


def test_llama_style_tokenizer_metadata(tmp_path: Path):
    src = make_model(tmp_path / "spm", tokenizer="llama-json")
    reader, _ = read_back(write_gguf(src, SafetensorsFolder(src), tmp_path / "s.gguf", "F32",
                                     progress=False))  # fmt: skip
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert types[:4] == [2, 3, 3, 6]  # UNKNOWN, CONTROL, CONTROL, BYTE
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    first = "".join(merges[0].split(" ") if isinstance(merges[0], str) else merges[0])
    assert scores[tokens.index(first)] == 0.0 and min(scores) == -(len(merges) - 1)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3"])
def test_other_architectures_round_trip(tmp_path: Path, arch: str):
    src = make_model(tmp_path / arch, arch=arch, tie=True)
    out = write_gguf(src, SafetensorsFolder(src), tmp_path / "m.gguf", "F32", progress=False)
    reader, got = read_back(out)
    gguf_arch = field(reader, "general.architecture")
    assert gguf_arch == arch
    assert field(reader, f"{arch}.attention.key_length") == 32
    assert field(reader, f"{arch}.block_count") == 2
    config = json.loads((src / "config.json").read_text())
    mapper = TensorMapper(config)
    state = hf_state(src)
    assert "output.weight" not in got  # all three tie the output to the embedding here
    for hf_name, value in state.items():
        gname = mapper.gguf_name(hf_name)
        if gname is None:
            assert hf_name == "lm_head.weight"
            continue
        expect = (
            value + 1 if arch.startswith("gemma") and hf_name.endswith("norm.weight") else value
        )
        assert np.array_equal(got[gname], expect.numpy()), (hf_name, gname)  # no permutation
    if arch == "gemma2":
        assert field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(50.0)
        assert field(reader, "gemma2.attention.sliding_window") == 64
    if arch == "gemma3":
        assert field(reader, "gemma3.rope.freq_base") == pytest.approx(1e6)
        assert field(reader, "gemma3.rope.freq_base_swa") == pytest.approx(1e4)
        assert field(reader, "tokenizer.ggml.add_space_prefix") is False


def test_sentencepiece_tokenizer_metadata(tmp_path: Path):
    import sentencepiece as spm

    src = make_model(tmp_path / "spm", tokenizer="spm", vocab_pad=3)
    reader, _ = read_back(write_gguf(src, SafetensorsFolder(src), tmp_path / "s.gguf", "F32",
                                     progress=False))  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    n = sp.vocab_size()
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    assert field(reader, "tokenizer.ggml.scores")[:n] == pytest.approx(
        [sp.get_score(i) for i in range(n)]
    )
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [2, 3, 3, 6]
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
