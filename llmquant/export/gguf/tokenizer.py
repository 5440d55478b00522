"""Tokenizer metadata for a GGUF file, from a Hugging Face folder.

Three kinds, chosen as llama.cpp's converter chooses them:
- ``tokenizer.model`` (SentencePiece, needs the ``sentencepiece`` package): model "llama", pieces
  with their scores and types;
- ``tokenizer.json`` BPE with byte fallback (Llama-2-style fast tokenizers, no sentencepiece
  needed): model "llama"; llama.cpp's SPM tokenizer merges the pair whose result scores highest,
  so each token gets score -(rank of the merge that makes it), which reproduces the BPE order
  (llama.cpp's own converter writes placeholder scores here);
- ``tokenizer.json`` byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama-3): model "gpt2", tokens,
  types, merges and the pre-tokenizer name ``tokenizer.ggml.pre``.

llama.cpp identifies a BPE pre-tokenizer by the sha256 of the token ids of one fixed text
(``get_vocab_base_pre`` in ``conversion/base.py``); ``PRE_TOKENIZER_HASHES`` holds the hashes of the
models we support. An unknown hash with the plain GPT-2 byte-level pre-tokenizer maps to "gpt-2"
(the same split regex in llama.cpp); anything else needs ``pre=`` from the caller.
Special token ids, merges and the chat template come from ``gguf.SpecialVocab``;
add_bos/add_eos are measured by encoding a text with the HF tokenizer, so the GGUF adds exactly
what transformers adds.
"""

from __future__ import annotations

import json
import logging
import re
from hashlib import sha256
from pathlib import Path

import gguf

log = logging.getLogger(__name__)

# The text llama.cpp's converter tokenizes to fingerprint a pre-tokenizer (verbatim).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(token ids of CHECK_TEXT)) -> llama.cpp pre-tokenizer name (llama.cpp 0c1e570).
PRE_TOKENIZER_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}

_LOOKS_SPECIAL_EXACT = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp's does_token_look_special)."""
    return (
        token in _LOOKS_SPECIAL_EXACT
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def pre_tokenizer_name(tokenizer_json: Path, pre: str | None = None) -> str:
    """``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``."""
    if pre is not None:
        return pre
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHECK_TEXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    pre_tok = _load_json(tokenizer_json).get("pre_tokenizer") or {}
    if pre_tok.get("type") == "ByteLevel" and pre_tok.get("use_regex", True):
        log.info("%s: unknown pre-tokenizer hash %s; plain GPT-2 byte-level -> 'gpt-2'",
                 tokenizer_json, digest)  # fmt: skip
        return "gpt-2"
    raise ValueError(
        f"{tokenizer_json}: BPE pre-tokenizer not recognised (llama.cpp hash {digest}); "
        "pass the llama.cpp pre-tokenizer name explicitly (e.g. pre='llama-bpe')"
    )


def _bpe_tokens(tokenizer_json: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types in id order, padded to ``vocab_size`` (llama.cpp's get_vocab_base)."""
    doc = _load_json(tokenizer_json)
    vocab: dict[str, int] = dict(doc["model"]["vocab"])
    added = {t["id"]: t for t in doc.get("added_tokens", [])}
    for tid, t in added.items():
        vocab[t["content"]] = tid
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"{tokenizer_json}: token id {max(vocab.values())} >= config vocab_size {vocab_size}"
        )
    by_id = {tid: tok for tok, tid in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tok = by_id[i]
            if added[i].get("special") or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(tok)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_scores(model: dict, tokens: list[str]) -> list[float]:
    """Score of each token: -(rank of the BPE merge producing it); 0 for tokens no merge makes."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _spm_tokens(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types of ``tokenizer.model`` (llama.cpp's _create_vocab_sentencepiece)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), int(kind)
    cfg_path = folder / "tokenizer_config.json"
    decoder = _load_json(cfg_path).get("added_tokens_decoder", {}) if cfg_path.is_file() else {}
    for tid_str, data in decoder.items():
        tid, text = int(tid_str), data["content"]
        if tid >= vocab_size:
            continue
        if data.get("special") or _looks_special(text):
            types[tid] = int(gguf.TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
            types[tid] = int(gguf.TokenType.USER_DEFINED)
        tokens[tid], scores[tid] = text.encode(), -1000.0
    return tokens, scores, types


def _measured_add_special(tokenizer_json: Path, special: gguf.SpecialVocab) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, measured on a plain text."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode("Hello world").ids
    out = {}
    for kind, pos in (("bos", 0), ("eos", -1)):
        tid = special.special_token_ids.get(kind)
        out[kind] = bool(ids) and tid is not None and ids[pos] == tid
    return out


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def add_tokenizer(
    writer: gguf.GGUFWriter,
    folder: Path,
    vocab_size: int,
    pre: str | None = None,
    add_space_prefix: bool | None = None,
) -> str:
    """Write the ``tokenizer.*`` keys for the HF tokenizer in ``folder``; returns the model kind."""
    folder = Path(folder)
    tok_json = folder / "tokenizer.json"
    tok_model = folder / "tokenizer.model"
    if tok_model.is_file() and (_has_sentencepiece() or not tok_json.is_file()):
        tokens, scores, types = _spm_tokens(folder, vocab_size)
        kind = "llama"
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    elif tok_json.is_file():
        model = _load_json(tok_json).get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{tok_json}: tokenizer model {model.get('type')!r} is not supported")
        if model.get("byte_fallback"):
            str_tokens, types = _bpe_tokens(tok_json, vocab_size)
            scores = _merge_scores(model, str_tokens)
            unk = model.get("unk_token")
            for i, tok in enumerate(str_tokens):
                if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
                    types[i] = gguf.TokenType.BYTE
                elif tok == unk:
                    types[i] = gguf.TokenType.UNKNOWN
            kind = "llama"
            writer.add_tokenizer_model(kind)
            writer.add_tokenizer_pre("default")
            writer.add_token_list(str_tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(folder, n_vocab=len(str_tokens))
        else:
            str_tokens, types = _bpe_tokens(tok_json, vocab_size)
            kind = "gpt2"
            writer.add_tokenizer_model(kind)
            writer.add_tokenizer_pre(pre_tokenizer_name(tok_json, pre))
            writer.add_token_list(str_tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(folder, load_merges=True)
        special.add_special_token.update(_measured_add_special(tok_json, special))
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")
    special.add_to_gguf(writer, quiet=True)
    if add_space_prefix is None:  # llama.cpp's converter copies the HF setting when present
        cfg_path = folder / "tokenizer_config.json"
        cfg = _load_json(cfg_path) if cfg_path.is_file() else {}
        add_space_prefix = cfg.get("add_prefix_space")
    if add_space_prefix is not None:
        writer.add_add_space_prefix(bool(add_space_prefix))
    return kind
