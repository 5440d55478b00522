"""tools/make_synthetic_model.py: random checkpoints with the exact configs of real models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_synthetic_model.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_synthetic_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


msm = _load_tool()

# The published config.json values (and parameter counts the model cards give) of each shape.
PUBLISHED = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        parameters=6_738_415_616,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, parameters=8_030_261_248,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=128001, parameters=1_235_814_400,
    ),
    "llama-3-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, parameters=70_553_706_496,
    ),
    "mistral-7b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=4096,
        bos_token_id=1, eos_token_id=2, parameters=7_241_732_096,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151643, parameters=7_615_616_512,
    ),
}  # fmt: skip

TEXT = "The king of the river city wrote 1999 pages on music, science and water; then Héloïse left!"


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def _expected_tensors(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What transformers itself would save for ``config``: its meta skeleton minus tied weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    return {
        name: (tuple(t.shape), t.dtype)
        for name, t in model.state_dict().items()
        if name not in tied
    }


def _no_staging_left(out: Path) -> bool:
    return not list(out.parent.glob(f".{out.name}.partial-*"))


def check_folder(out: Path, shape_name: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Everything a written folder must satisfy; returns its config.json."""
    doc = json.loads((out / "config.json").read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    assert doc["dtype"] == doc["torch_dtype"] == dtype_name
    assert doc["architectures"] == [msm.SHAPES[shape_name].architecture]
    label = doc["llmquant_synthetic"]
    assert (label["shape"], label["seed"]) == (shape_name, seed)
    assert "never for quality" in label["note"]

    config = AutoConfig.from_pretrained(out)
    expected = _expected_tensors(config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(expected)

    found: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for file_name in sorted(set(weight_map.values())):
        with safe_open(out / file_name, framework="pt") as shard:
            assert shard.metadata() == {"format": "pt"}
            for name in shard.keys():
                assert weight_map[name] == file_name, f"{name} is in {file_name}, index disagrees"
                tensor = shard.get_tensor(name)
                found[name] = (tuple(tensor.shape), tensor.dtype)
                assert torch.isfinite(tensor).all(), name
                if tensor.dim() == 1 and name.endswith(".weight"):
                    assert torch.all(tensor == 1), f"{name}: norm scales should be ones"
                elif tensor.numel() > 1000:  # a sample is enough, and quick on 7B tensors
                    sample = tensor.flatten()[:100_000].float()
                    assert 0.015 < sample.std().item() < 0.025, name
    assert found == expected  # names, shapes and dtypes exactly; no tensor outside the index
    assert all(dt == dtype for _, dt in found.values())
    total = sum(torch.Size(s).numel() * dt.itemsize for s, dt in found.values())
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["total_parameters"] == sum(
        torch.Size(s).numel() for s, _ in found.values()
    )

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == config.bos_token_id
    assert generation["eos_token_id"] == config.eos_token_id

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT).input_ids
    assert len(ids) > 5 and max(ids) < config.vocab_size
    assert len(tokenizer) <= config.vocab_size
    assert tokenizer.bos_token is not None and tokenizer.eos_token is not None
    assert tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert _no_staging_left(out)
    return doc


@pytest.mark.parametrize("shape_name", sorted(PUBLISHED))
def test_config_is_the_published_one(shape_name):
    published = dict(PUBLISHED[shape_name])
    parameters = published.pop("parameters")
    config = msm.build_config(shape_name, "bfloat16")
    for key, value in published.items():
        actual = _rope_theta(config) if key == "rope_theta" else getattr(config, key)
        assert actual == value, key
    assert config.hidden_act == "silu"
    specs = msm.tensor_specs(config)
    assert sum(spec.numel for spec in specs) == parameters
    if shape_name == "qwen2.5-7b":
        assert "model.layers.0.self_attn.q_proj.bias" in {spec.name for spec in specs}


@pytest.mark.parametrize("shape_name", sorted(msm.SHAPES))
def test_tensor_specs_are_the_skeletons(shape_name):
    config = msm.build_config(shape_name, "float16", layers=2)
    specs = msm.tensor_specs(config)
    assert {s.name: (s.shape, s.dtype) for s in specs} == _expected_tensors(config)
    assert all(spec.dtype == torch.float16 for spec in specs)
    assert config.num_hidden_layers == 2
    assert config.llmquant_synthetic["overrides"] == {"num_hidden_layers": 2}
    tied = config.tie_word_embeddings
    assert ("lm_head.weight" in {s.name for s in specs}) is not tied


def test_plan_shards_respects_the_limit():
    specs = [msm.TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([5, 5, 30, 5, 5])]
    shards = msm.plan_shards(specs, max_shard_bytes=40)
    # As huggingface_hub splits: an oversized tensor gets its own shard at once.
    assert [[s.name for s in shard] for shard in shards] == [["t2"], ["t0", "t1"], ["t3", "t4"]]


def test_special_ids_move_to_the_end_of_a_smaller_vocab():
    config = msm.build_config("llama-3-8b", "bfloat16", layers=1, vocab_size=1000)
    assert (config.bos_token_id, config.eos_token_id) == (998, 999)
    config = msm.build_config("llama-2-7b", "bfloat16", vocab_size=1000)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    msm.write_synthetic_model(out, "llama-tiny", dtype="bfloat16", seed=3)
    return out


def test_tiny_folder(tiny_dir):
    doc = check_folder(tiny_dir, "llama-tiny", torch.bfloat16, seed=3)
    assert doc["tie_word_embeddings"] is True


def test_tiny_loads_in_transformers(tiny_dir, one_torch_thread):
    model, info = AutoModelForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 1e-3  # not degenerate


def test_weights_depend_on_seed_and_name_not_on_sharding(tmp_path, tiny_dir):
    sharded = tmp_path / "sharded"
    msm.write_synthetic_model(
        sharded, "llama-tiny", dtype="bfloat16", seed=3, max_shard_bytes=20_000
    )
    other_seed = tmp_path / "other"
    msm.write_synthetic_model(other_seed, "llama-tiny", dtype="bfloat16", seed=4)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3
    name = "model.layers.1.mlp.down_proj.weight"

    def tensor(folder: Path):
        file_name = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(folder / file_name[name], framework="pt") as shard:
            return shard.get_tensor(name)

    assert torch.equal(tensor(sharded), tensor(tiny_dir))
    assert not torch.equal(tensor(other_seed), tensor(tiny_dir))
    for file_name in set(index.values()):
        with safe_open(sharded / file_name, framework="pt") as shard:
            sizes = [shard.get_slice(n).get_shape() for n in shard.keys()]
        total = sum(torch.Size(s).numel() * 2 for s in sizes)
        assert total <= 20_000 or len(sizes) == 1


def test_llama_2_7b_one_layer(tmp_path, capsys):
    """The real 7B embedding and block shapes (0.93 GB), in several shards, via the CLI."""
    out = tmp_path / "llama2"
    assert msm.main(["--shape", "llama-2-7b", "--layers", "1", "--dtype", "float16",
                     "--max-shard-gb", "0.3", str(out)]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(out)) and "12 tensors" in line and "929062912 bytes" in line
    assert line.endswith("random weights, shapes of llama-2-7b")
    doc = check_folder(out, "llama-2-7b", torch.float16)
    assert doc["num_hidden_layers"] == 1 and doc["hidden_size"] == 4096
    assert doc["vocab_size"] == 32000 and doc["intermediate_size"] == 11008
    assert len(list(out.glob("*.safetensors"))) > 1


def test_qwen_one_layer_small_vocab(tmp_path):
    """Qwen2.5's attention biases and its (shared) special token, with a small embedding."""
    out = tmp_path / "qwen"
    msm.write_synthetic_model(out, "qwen2.5-7b", layers=1, vocab_size=512)
    doc = check_folder(out, "qwen2.5-7b", torch.bfloat16)
    assert doc["llmquant_synthetic"]["overrides"] == {"num_hidden_layers": 1, "vocab_size": 512}
    assert doc["bos_token_id"] == doc["eos_token_id"] == 511
    assert doc["hidden_size"] == 3584 and doc["num_key_value_heads"] == 4


def test_writes_into_an_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    msm.write_synthetic_model(out, "llama-tiny")
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--shape", "gpt-5"], "--shape"),
        (["--shape", "llama-tiny", "--dtype", "int8"], "--dtype"),
        (["--shape", "llama-tiny", "--layers", "0"], "--layers"),
        (["--shape", "llama-tiny", "--vocab-size", "100"], "--vocab-size"),
        (["--shape", "llama-tiny", "--max-shard-gb", "0"], "--max-shard-gb"),
    ],
)
def test_bad_arguments_exit_2_before_writing(tmp_path, capsys, args, named):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        msm.main([*args, str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}" in err
    if named == "--shape":
        assert all(name in err for name in msm.SHAPES)  # the known shapes are listed
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_out_exits_2_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        msm.main(["--shape", "llama-tiny", str(out)])
    assert exc.value.code == 2
    assert "argument OUT" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _no_staging_left(out)


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_init(spec, seed):
        calls.append(spec.name)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return torch.zeros(spec.shape, dtype=spec.dtype)

    monkeypatch.setattr(msm, "init_tensor", failing_init)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        msm.write_synthetic_model(out, "llama-tiny", max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []


def test_script_exit_code(tmp_path):
    """Run as a script (its own sys.path), an unknown shape is a usage error."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--shape", "nope", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "argument --shape" in result.stderr and "llama-2-7b" in result.stderr
    assert not out.exists()
