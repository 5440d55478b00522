"""Tiny randomly initialised models of every family in the architecture table (no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

WORDS = (
    "the of and a to in is was for on as with by he at from his an were are which this be or "
    "river city king music war science water light stone paper energy field number garden"
).split()

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
)

FAMILIES = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8),
    "phi3": lambda: Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0),
    "llama_mha": lambda: LlamaConfig(**{**_COMMON, "num_key_value_heads": 4}),
}


def make_documents(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


def make_tokenizer(folder: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        make_documents(200, seed=1),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    return tok


def make_model(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random model of ``family`` (plus tokenizer) as a Hugging Face folder."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    folder = Path(folder)
    model.save_pretrained(folder)
    make_tokenizer(folder, config.vocab_size)
    return folder


def make_text_file(path: Path, n: int = 400) -> Path:
    with open(path, "w") as f:
        for doc in make_documents(n):
            f.write(json.dumps({"text": doc}) + "\n")
    return path
