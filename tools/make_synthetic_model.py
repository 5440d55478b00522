"""Write a randomly initialised checkpoint with the exact config of a named real model.

    python tools/make_synthetic_model.py --shape llama-2-7b --dtype bfloat16 OUT \\
        [--layers N] [--vocab-size V] [--seed S] [--max-shard-gb 2]

OUT becomes a Hugging Face folder: safetensors shards with ``model.safetensors.index.json``,
``config.json``, ``generation_config.json`` and a small byte-level BPE tokenizer whose ids fit the
vocabulary. The weights are random (deterministic per tensor from --seed and the tensor name), so
the folder is good for measuring memory and time of quantization and export, never for quality;
config.json says so under ``llmquant_synthetic``.

The model is never held in memory: the tensor names and shapes come from a skeleton built on the
meta device, each tensor is generated on its own, and one shard at a time is written and freed,
so the peak is about one shard (--max-shard-gb), not the model. Everything is written into a
hidden folder next to OUT and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("make_synthetic_model")

SYNTHETIC_KEY = "llmquant_synthetic"
SYNTHETIC_NOTE = "random weights: good for memory and time, never for quality"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHT_STD = 0.02  # the initializer_range of every supported config
DEFAULT_MAX_SHARD_GB = 2.0
GB = 10**9  # transformers' "5GB" shard size is decimal
# The tokenizer is a small BPE however large the model's vocabulary: ids stay valid, and training
# it takes a fraction of a second.
TRAINED_VOCAB_SIZE = 1024
# Byte-level BPE starts from all 256 byte symbols; a vocabulary must hold them plus the specials.
MIN_VOCAB_SIZE = 256 + 8


@dataclass(frozen=True)
class ModelShape:
    """The published config of one real model and the special tokens its tokenizer has."""

    model_type: str
    architecture: str
    config: dict[str, Any]
    # role (bos/eos/unk) -> (token text, id in the real tokenizer)
    special_tokens: dict[str, tuple[str, int]]
    source: str  # the published config.json the values come from
    # The real tokenizer puts BOS in front of every text (Llama, Mistral; not Qwen2.5).
    add_bos_token: bool = True


_LLAMA2_SPECIALS = {"unk": ("<unk>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2)}
_LLAMA3_SPECIALS = {"bos": ("<|begin_of_text|>", 128000), "eos": ("<|end_of_text|>", 128001)}
_LLAMA3_COMMON = dict(
    vocab_size=128256,
    num_key_value_heads=8,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=128000,
    eos_token_id=128001,
)

SHAPES: dict[str, ModelShape] = {
    "llama-tiny": ModelShape(
        "llama",
        "LlamaForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            hidden_act="silu",
            bos_token_id=0,
            eos_token_id=1,
        ),
        {"bos": ("<s>", 0), "eos": ("</s>", 1)},
        "none: a tiny Llama with tied embeddings, for tests",
    ),
    "llama-2-7b": ModelShape(
        "llama",
        "LlamaForCausalLM",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            hidden_act="silu",
            bos_token_id=1,
            eos_token_id=2,
        ),
        _LLAMA2_SPECIALS,
        "meta-llama/Llama-2-7b-hf",
    ),
    "llama-3-8b": ModelShape(
        "llama",
        "LlamaForCausalLM",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            **_LLAMA3_COMMON,
        ),
        _LLAMA3_SPECIALS,
        "meta-llama/Meta-Llama-3-8B",
    ),
    "llama-3.2-1b": ModelShape(
        "llama",
        "LlamaForCausalLM",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            **{**_LLAMA3_COMMON, "max_position_embeddings": 131072, "tie_word_embeddings": True},
        ),
        _LLAMA3_SPECIALS,
        "meta-llama/Llama-3.2-1B (without its llama3 rope scaling)",
    ),
    "llama-3-70b": ModelShape(
        "llama",
        "LlamaForCausalLM",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            **_LLAMA3_COMMON,
        ),
        _LLAMA3_SPECIALS,
        "meta-llama/Meta-Llama-3-70B",
    ),
    "mistral-7b": ModelShape(
        "mistral",
        "MistralForCausalLM",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=32768,
            sliding_window=4096,
            tie_word_embeddings=False,
            hidden_act="silu",
            bos_token_id=1,
            eos_token_id=2,
        ),
        _LLAMA2_SPECIALS,
        "mistralai/Mistral-7B-v0.1",
    ),
    "qwen2.5-7b": ModelShape(
        "qwen2",
        "Qwen2ForCausalLM",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=131072,
            sliding_window=131072,
            use_sliding_window=False,
            max_window_layers=28,
            tie_word_embeddings=False,
            hidden_act="silu",
            bos_token_id=151643,
            eos_token_id=151643,
        ),
        {"bos": ("<|endoftext|>", 151643), "eos": ("<|endoftext|>", 151643)},
        "Qwen/Qwen2.5-7B (q/k/v projections have biases)",
        add_bos_token=False,
    ),
}


class SyntheticInputError(ValueError):
    """OUT cannot take the model (not empty, no room); raised before anything is written."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class SyntheticSummary:
    path: Path
    shape_name: str
    num_tensors: int
    total_bytes: int
    shard_files: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.path}: {self.num_tensors} tensors, {self.total_bytes} bytes "
            f"({self.total_bytes / GB:.2f} GB) in {len(self.shard_files)} shard(s), "
            f"random weights, shapes of {self.shape_name}"
        )


def special_token_ids(shape: ModelShape, vocab_size: int) -> dict[str, tuple[str, int]]:
    """The shape's special tokens, with ids that do not fit a smaller --vocab-size moved to its end.

    Real vocabularies keep their specials at the end too (Llama-3, Qwen2.5), and moving them keeps
    config.json, generation_config.json and the tokenizer agreeing on every id.
    """
    texts_by_id: dict[int, str] = {}
    for text, tid in shape.special_tokens.values():
        texts_by_id[tid] = text
    too_big = sorted(tid for tid in texts_by_id if tid >= vocab_size)
    moved = {tid: vocab_size - len(too_big) + i for i, tid in enumerate(too_big)}
    return {role: (text, moved.get(tid, tid)) for role, (text, tid) in shape.special_tokens.items()}


def build_config(
    shape_name: str,
    dtype: str,
    layers: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
):
    """The transformers config of ``shape_name`` (with the overrides), labelled as synthetic."""
    from transformers import AutoConfig

    shape = SHAPES[shape_name]
    values = dict(shape.config)
    overrides: dict[str, int] = {}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    values.update(overrides)
    specials = special_token_ids(shape, values["vocab_size"])
    for role in ("bos", "eos"):
        if role in specials:
            values[f"{role}_token_id"] = specials[role][1]
    label: dict[str, Any] = {
        "shape": shape_name,
        "config_of": shape.source,
        "seed": seed,
        "note": SYNTHETIC_NOTE,
    }
    if overrides:
        label["overrides"] = overrides
    # num_hidden_layers goes in at construction: configs derive per-layer fields (Qwen2's
    # layer_types) from it.
    config = AutoConfig.for_model(
        shape.model_type, architectures=[shape.architecture], **values, **{SYNTHETIC_KEY: label}
    )
    config.dtype = DTYPES[dtype]
    return config


def tensor_specs(config) -> list[TensorSpec]:
    """Names, shapes and dtypes of the tensors ``save_pretrained`` would write for ``config``.

    The skeleton is built on the meta device (no memory); tied weights (lm_head.weight when
    tie_word_embeddings is true) are left out, as transformers leaves them out of the files.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    specs = [
        TensorSpec(name, tuple(tensor.shape), tensor.dtype)
        for name, tensor in skeleton.state_dict().items()
        if name not in tied
    ]
    return specs


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy shards in state_dict order, as huggingface_hub splits a state dict.

    A tensor bigger than the limit gets a shard of its own, listed when it is met (before the
    shard still being filled), as huggingface_hub does.
    """
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if spec.nbytes > max_shard_bytes:
            shards.append([spec])
            continue
        if current and current_bytes + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed that depends only on --seed and the tensor name (not on order or shards)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """One tensor of random weights that give finite, non-degenerate activations.

    Matrices and biases: normal(0, 0.02), the models' own initializer_range. Other 1-D weights are
    norm scales (RMSNorm in every supported family): ones, so activations keep their scale.
    """
    tensor = torch.empty(spec.shape, dtype=spec.dtype)
    if len(spec.shape) == 1 and spec.name.endswith(".weight"):
        return tensor.fill_(1.0)
    generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    # In place in the target dtype: no float32 copy of a 2 GB embedding.
    return tensor.normal_(0.0, WEIGHT_STD, generator=generator)


def _training_text(seed: int, documents: int = 2000) -> Iterator[str]:
    """Deterministic English-like text: words, numbers and punctuation the BPE can merge."""
    words = (
        "the of and a to in is was for on as with by he she at from his her an were are which "
        "this be or it that not have had but they you we one all their there been has would "
        "river city king music war science water light stone paper energy field number garden "
        "history language system people world country village school market winter summer "
        "mountain station library season morning evening question answer machine model weight"
    ).split()
    rng = random.Random(seed)
    for _ in range(documents):
        parts = []
        for _ in range(rng.randint(8, 40)):
            roll = rng.random()
            if roll < 0.05:
                parts.append(str(rng.randint(0, 2025)))
            elif roll < 0.1:
                parts.append(rng.choice(words).capitalize())
            else:
                parts.append(rng.choice(words))
        yield " ".join(parts) + rng.choice([".", ".", ".", "!", "?", ";"]) + "\n"


def write_tokenizer(folder: Path, config, shape: ModelShape, seed: int) -> int:
    """Train a small byte-level BPE and save it with its specials at the config's ids.

    Trained tokens take the lowest free ids; if a special id lies above them (Llama-3's 128000),
    the ids in between are filled with placeholder tokens no merge can produce, so the vocabulary
    has no holes and every id is below vocab_size. Returns the tokenizer's size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_token_ids(shape, config.vocab_size)
    special_ids = {text: tid for text, tid in specials.values()}
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(TRAINED_VOCAB_SIZE, config.vocab_size - len(special_ids)),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(seed), trainer=trainer)

    doc = json.loads(tokenizer.to_str())
    trained = sorted(doc["model"]["vocab"].items(), key=lambda item: item[1])
    taken = set(special_ids.values())
    free_ids = (i for i in range(config.vocab_size) if i not in taken)
    vocab = {token: next(free_ids) for token, _ in trained}
    vocab.update(special_ids)
    used = set(vocab.values())
    for tid in range(max(used)):
        if tid not in used:
            vocab[f"<|synthetic_filler_{tid}|>"] = tid
    doc["model"]["vocab"] = vocab
    doc["added_tokens"] = [
        {
            "id": tid,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for text, tid in sorted(special_ids.items(), key=lambda item: item[1])
    ]
    tokenizer = Tokenizer.from_str(json.dumps(doc))
    if shape.add_bos_token:
        bos_text, bos_id = specials["bos"]
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos_text}:0 $A:0",
                    pair=f"{bos_text}:0 $A:0 {bos_text}:1 $B:1",
                    special_tokens=[(bos_text, bos_id)],
                ),
            ]
        )
    roles = {f"{role}_token": text for role, (text, _) in specials.items()}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=config.max_position_embeddings,
        **roles,
    )
    fast.save_pretrained(folder)
    return len(fast)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_out_dir(out: Path) -> str | None:
    """Why ``out`` cannot be written, or None. It may be absent or an empty folder."""
    if out.is_dir():
        if any(out.iterdir()):
            return f"{out} exists and is not empty"
    elif out.exists() or out.is_symlink():
        return f"{out} exists and is not a folder"
    if not os.access(_nearest_existing(out.parent), os.W_OK):
        return f"cannot write into {_nearest_existing(out.parent)}"
    return None


def write_synthetic_model(
    out: Path,
    shape_name: str,
    dtype: str = "bfloat16",
    layers: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    max_shard_bytes: int = int(DEFAULT_MAX_SHARD_GB * GB),
) -> SyntheticSummary:
    """Write the synthetic checkpoint to ``out`` (absent or empty); see the module docstring."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig

    out = Path(out)
    problem = check_out_dir(out)
    if problem:
        raise SyntheticInputError(problem)
    config = build_config(shape_name, dtype, layers, vocab_size, seed)
    specs = tensor_specs(config)
    shards = plan_shards(specs, max_shard_bytes)
    total_bytes = sum(spec.nbytes for spec in specs)
    free = shutil.disk_usage(_nearest_existing(out.parent)).free
    if total_bytes > free:
        raise SyntheticInputError(
            f"{out} needs {total_bytes / GB:.2f} GB, {free / GB:.2f} GB free there"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; OUT should not be
        weight_map: dict[str, str] = {}
        names = [shard_file_name(i, len(shards)) for i in range(len(shards))]
        log.info(
            "%s: %d tensors, %.2f GB in %d shard(s)",
            shape_name,
            len(specs),
            total_bytes / GB,
            len(shards),
        )
        with tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="synthetic weights", disable=None
        ) as progress:
            for file_name, shard in zip(names, shards):
                tensors: dict[str, torch.Tensor] = {}
                for spec in shard:
                    tensors[spec.name] = init_tensor(spec, seed)
                    weight_map[spec.name] = file_name
                    progress.update(spec.nbytes)
                save_file(tensors, staging / file_name, metadata={"format": "pt"})
                del tensors  # free the shard before the next one is generated
        index = {
            "metadata": {
                "total_parameters": sum(spec.numel for spec in specs),
                "total_size": total_bytes,
            },
            "weight_map": weight_map,
        }
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.save_pretrained(staging)
        _add_legacy_dtype_key(staging / "config.json", dtype)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        tokens = write_tokenizer(staging, config, SHAPES[shape_name], seed)
        log.info("tokenizer: %d tokens (vocab_size %d)", tokens, config.vocab_size)
        for written in staging.iterdir():
            os.chmod(written, 0o666 & ~umask)  # safetensors writes its files private
        # One rename: OUT appears complete or not at all (it replaces an empty OUT folder).
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SyntheticSummary(out, shape_name, len(specs), total_bytes, names)


def _add_legacy_dtype_key(config_path: Path, dtype: str) -> None:
    """transformers 5 writes ``dtype``; older readers (transformers 4) read ``torch_dtype``."""
    doc = json.loads(config_path.read_text())
    doc["torch_dtype"] = dtype
    config_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a randomly initialised checkpoint with the exact config of a real "
        "model (for memory and time measurements, never for quality).",
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="folder to create (absent or empty)")
    parser.add_argument(
        "--shape",
        required=True,
        choices=sorted(SHAPES),
        help="the real model whose config is copied",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(DTYPES),
        help="dtype of every tensor (default bfloat16)",
    )
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument(
        "--vocab-size", type=int, help="override vocab_size (smaller embeddings for quick tests)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_MAX_SHARD_GB,
        help="largest shard in GB (1e9 bytes; default %(default)s); peak memory is about one shard",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Every check before anything is written; parser.error exits 2 naming the argument.
    if args.layers is not None and args.layers < 1:
        parser.error(f"argument --layers: must be at least 1, got {args.layers}")
    if args.vocab_size is not None and args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(
            f"argument --vocab-size: must be at least {MIN_VOCAB_SIZE} (the byte-level "
            f"tokenizer's alphabet and specials), got {args.vocab_size}"
        )
    if args.seed < 0:
        parser.error(f"argument --seed: must be >= 0, got {args.seed}")
    if not args.max_shard_gb > 0:
        parser.error(f"argument --max-shard-gb: must be > 0, got {args.max_shard_gb}")
    problem = check_out_dir(args.out)
    if problem:
        parser.error(f"argument OUT: {problem}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        summary = write_synthetic_model(
            args.out,
            args.shape,
            dtype=args.dtype,
            layers=args.layers,
            vocab_size=args.vocab_size,
            seed=args.seed,
            max_shard_bytes=int(args.max_shard_gb * GB),
        )
    except SyntheticInputError as err:
        parser.error(f"argument OUT: {err}")
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
