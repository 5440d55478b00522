"""The bad-input table: every wrong input or fault a user can meet, one row each.

Each row runs ``python -m llmquant.run`` or ``python -m llmquant.eval`` in-process on a fresh
copy of a tiny model and asserts three things: the exit code (2 bad input, 1 environment or
internal failure), that the message names the culprit (the key's path, the file, the tensor),
and that the output folder holds nothing new (no half-written file, no export beside an old
report). Every new option gets its bad-value row here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import make_model, make_text_file

from llmquant import eval as eval_cli
from llmquant import run as run_cli
from llmquant.recipe import usable_cpus

# A recipe small enough that a row whose failure comes after work still takes seconds.
TINY = (
    "calibration.n_samples=2", "calibration.seq_len=16", "evaluation.n_windows=2",
    "evaluation.seq_len=16", "quant.group_size=16", "awq.n_grid=2", "awq.clip_n_grid=2",
)  # fmt: skip


@dataclass
class Env:
    """One row's world: its own model copy, text file and output folder."""

    root: Path
    model: Path
    text: Path
    out: Path

    def recipe(self, body: str) -> Path:
        path = self.root / "recipe.yaml"
        path.write_text(_fill(body, {"model": self.model, "text": self.text, "root": self.root}))
        return path


@dataclass(frozen=True)
class Case:
    id: str
    # Arguments of the command; "{model}", "{text}", "{out}", "{root}" are filled in. For "run"
    # the tiny recipe's --set overrides come first, so a row's own --set wins.
    argv: tuple[str, ...]
    named: tuple[str, ...]  # substrings the error output must contain
    code: int = 2
    tool: str = "run"  # or "eval"
    prepare: Callable[[Env], None] | None = None  # damages the world before the command
    tiny: bool = True  # prepend TINY and the model/text overrides (run only)
    # A fault injected in-process before the command (a full disk), undone after the row.
    fault: Callable[[Env, pytest.MonkeyPatch], None] | None = None
    # Top-level names under --out the row may leave: the finished blocks a --resume reuses.
    kept: tuple[str, ...] = ()


def _sets(*items: str) -> tuple[str, ...]:
    return tuple(x for item in items for x in ("--set", item))


def _fill(template: str, values: dict) -> str:
    """``template`` with "{key}" replaced by ``values[key]`` (YAML braces stay as they are)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def _state(out: Path) -> dict[str, tuple[int, int]]:
    if not out.exists():
        return {}
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in out.rglob("*")}  # fmt: skip


CASES = [
    # --- recipe keys (already handled before this table existed) ---
    Case("unknown-key", ("recipes/llama_w4.yaml", *_sets("quant.group=64")), ("quant.group",)),
    Case("bits-out-of-range", ("recipes/llama_w4.yaml", *_sets("quant.bits=9")), ("quant.bits",)),
    Case(
        "group-size-does-not-divide",
        ("recipes/llama_w4.yaml", *_sets("quant.group_size=48")),
        ("model.layers.0.self_attn.q_proj", "48"),
    ),
    Case(
        "int-key-with-gguf-format",
        ("recipes/llama_w4_gguf.yaml", *_sets("quant.bits=8")),
        ("quant",),
    ),
    Case(
        "export-name-escapes-out",
        ("recipes/llama_w4.yaml", *_sets("export=[{kind: compressed-tensors, name: ../x}]")),
        ("export[0].name",),
    ),
    Case(
        "export-name-is-blocks",
        ("recipes/llama_w4.yaml", *_sets("export=[{kind: compressed-tensors, name: blocks}]")),
        ("export[0].name",),
    ),
    Case("missing-recipe-file", ("no/such/recipe.yaml",), ("no/such/recipe.yaml",), tiny=False),
    Case(
        "missing-model-folder",
        ("recipes/llama_w4.yaml", *_sets("model.source=./no/such/model")),
        ("no/such/model",),
    ),
    Case(
        "device-that-does-not-exist",
        ("recipes/llama_w4.yaml", *_sets("runtime.device=cuda:3")),
        ("runtime.device",),
    ),
    Case(
        "eval-device-that-does-not-exist",
        ("--baseline", "{model}", "--text", "{text}", "--device", "cuda:3", "--out", "{out}"),
        ("device",),
        tool="eval",
    ),
]

# Non-finite values and corrupt or damaged files (issue 12, items 1 and 3).


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16  # the header length and its first bytes
    path.write_bytes(bytes(data))


def _damage_weights(damage: Callable[[Path], None]) -> Callable[[Env], None]:
    return lambda env: damage(env.model / "model.safetensors")


def _truncated_gguf(env: Env) -> None:
    _gguf_of_model(env)
    _truncate(env.root / "m.gguf")


def _bad_job_yaml(env: Env) -> None:
    (env.root / "job.yaml").write_text("name: j\nbaseline: {name: b, path: x\nmodels: []\n")


def _disk_full(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llmquant.export.common.write_safetensors", full)
    monkeypatch.setattr("gguf.GGUFWriter.write_tensor_data", full)


# The table's W4 and EVAL are defined below, with the rows of items 2, 6 and 7.
_W4 = "recipes/llama_w4.yaml"
_EVAL = ("--text", "{text}", "--n-windows", "2", "--seq-len", "16", "--out", "{out}")
_TRUNCATED = ("{model}/model.safetensors", "truncated or not a safetensors file", "re-download")
_CT = "export=[{kind: compressed-tensors}]"
_GGUF_EXPORT = "export=[{kind: gguf, types: [Q8_0]}]"
CASES_FILES: list[Case] = [
    # --- a corrupt source: exit 2 naming the file, before any block ---
    Case("source-safetensors-truncated", (_W4,), _TRUNCATED,
         prepare=_damage_weights(_truncate)),
    Case("source-safetensors-garbage-header", (_W4,), _TRUNCATED,
         prepare=_damage_weights(_garble_header)),
    Case("eval-baseline-safetensors-truncated", ("--baseline", "{model}", *_EVAL), _TRUNCATED,
         tool="eval", prepare=_damage_weights(_truncate)),
    Case("eval-model-safetensors-garbage-header",
         ("--baseline", "{root}/base", "--model", "q={model}", *_EVAL), _TRUNCATED, tool="eval",
         prepare=lambda env: (shutil.copytree(env.model, env.root / "base"),
                              _garble_header(env.model / "model.safetensors"))),
    Case("source-gguf-truncated", (_W4, *_sets("model.source={root}/m.gguf")),
         ("{root}/m.gguf", "truncated or not a GGUF file"), prepare=_truncated_gguf),
    Case("eval-baseline-gguf-truncated", ("--baseline", "{root}/m.gguf", *_EVAL),
         ("{root}/m.gguf", "truncated or not a GGUF file"), tool="eval", prepare=_truncated_gguf),
    Case("eval-model-gguf-truncated",
         ("--baseline", "{model}", "--model", "q={root}/m.gguf", *_EVAL),
         ("{root}/m.gguf", "truncated or not a GGUF file"), tool="eval", prepare=_truncated_gguf),
    Case("eval-model-gguf-truncated-dequantized",
         ("--baseline", "{model}", "--model", "q={root}/m.gguf", "--dequantize-gguf", *_EVAL),
         ("{root}/m.gguf", "truncated or not a GGUF file"), tool="eval", prepare=_truncated_gguf),
    # --- an evaluation job that is not YAML: the file and the line ---
    Case("eval-job-yaml-syntax-error", ("{root}/job.yaml", "--out", "{out}"),
         ("{root}/job.yaml:3:7", "not valid YAML", "expected ',' or '}'", "starts at line 2"),
         tool="eval", prepare=_bad_job_yaml),
    Case("recipe-yaml-syntax-error", ("{root}/recipe.yaml",),
         ("{root}/recipe.yaml:2:1", "not valid YAML", "'\\t'"),
         prepare=lambda env: env.recipe("quant:\n\tbits: 4\n")),
    # --- a full disk while writing an export: exit 1, the path, free space, nothing left ---
    Case("disk-full-safetensors-export", (_W4, *_sets(_CT)),
         ("{out}/compressed-tensors", "no space left", "free"), code=1, fault=_disk_full,
         kept=("blocks",)),
    Case("disk-full-gguf-export", (_W4, *_sets(_GGUF_EXPORT)),
         ("{out}/", ".gguf", "no space left", "free"), code=1, fault=_disk_full,
         kept=("blocks",)),
]  # fmt: skip

# Caches, resume and the output folder (items 4 and 5).
CASES_STATE: list[Case] = []

# The recipe checked as a whole, paths, data files and the evaluator (items 2, 6 and 7).


def _write(name: str, text: str) -> Callable[[Env], None]:
    """A prepare step writing ``text`` to ``{root}/name``."""
    return lambda env: (env.root / name).write_text(_fill(text, {"root": env.root}))


def _gguf_of_model(env: Env) -> None:
    from llmquant.export.gguf.writer import write_gguf
    from llmquant.tensors import SafetensorsFolder

    write_gguf(env.model, SafetensorsFolder(env.model), env.root / "m.gguf", "F32", progress=False)


def _not_a_model(env: Env) -> None:
    (env.root / "notmodel").mkdir()
    (env.root / "notmodel" / "weights.bin").write_bytes(b"\0" * 16)


W4 = "recipes/llama_w4.yaml"
GGUF_RUN = "quant={format: gguf, gguf_mix: Q8_0}"
# The tiny model's rows (64, 128) fit the 32-blocks: Q4_0 (4.5 bpw) to Q8_0 (8.5 bpw).
TARGET_RUN = "quant={{format: gguf, gguf_mix: Q8_0, candidates: [Q4_0, Q8_0], {}}}"
TARGET_EXPORT = "export=[{kind: gguf, types: [target]}]"
INT_CT = "export=[{kind: compressed-tensors}]"
# The default candidates on the tiny model (widths 64 and 128: int4 g32, 5.125 bpw with its
# float32 scales and zero points, fits all; int4 g128 (4.28) and int8 g128 (8.31) only the
# 128-wide down_proj), as compressed-tensors stores them.
INT_RANGE = "4.962 to 5.858 bits per weight of the quantized linears"
EVAL = ("--text", "{text}", "--n-windows", "2", "--seq-len", "16", "--out", "{out}")
CASES_INPUTS: list[Case] = [
    # --- each export against quant: exit 2 naming the export and the quant key ---
    Case("awq-gemm-needs-4-bit", (W4, *_sets("quant.bits=8")),
         ("export[0] (awq-gemm)", "quant.bits is 8")),
    Case("awq-gemm-needs-zero-point", (W4, *_sets("quant.symmetric=true")),
         ("export[0] (awq-gemm)", "quant.symmetric")),
    Case("awq-gemm-group-size-it-cannot-read", (W4, *_sets("quant.group_size=8")),
         ("export[0] (awq-gemm)", "quant.group_size is 8")),
    Case("compressed-tensors-bits-it-cannot-pack",
         (W4, *_sets("quant.bits=3", "export=[{kind: compressed-tensors}]")),
         ("export[0] (compressed-tensors)", "quant.bits is 3")),
    Case("compressed-tensors-from-gguf-run",
         (W4, *_sets(GGUF_RUN, "export=[{kind: compressed-tensors}]")),
         ("export[0]", "compressed-tensors packs integer codes", "quant.format: int")),
    Case("awq-gemm-from-gguf-run", (W4, *_sets(GGUF_RUN, "export=[{kind: awq-gemm}]")),
         ("export[0]", "awq-gemm packs integer codes")),
    # --- GGUF mixes and type names ---
    Case("gguf-mix-unknown", (W4, *_sets("quant={format: gguf, gguf_mix: Q9_X}", "export=[]")),
         ("quant.gguf_mix", "Q9_X")),
    Case("gguf-export-type-unknown", (W4, *_sets("export=[{kind: gguf, types: [Q8_0, Q9]}]")),
         ("export[0].types[1]", "Q9")),
    Case("gguf-export-type-listed-twice",
         (W4, *_sets("export=[{kind: gguf, types: [Q8_0, q8_0]}]")),
         ("export[0].types[1]", "export[0].types[0]")),
    Case("gguf-export-no-types", (W4, *_sets("export=[{kind: gguf, types: []}]")),
         ("export[0].types",)),
    Case("gguf-mix-needs-importance",
         (W4, *_sets("export=[{kind: gguf, types: [Q2_K_S], importance: false}]")),
         ("export[0].types[0]", "Q2_K_S", "importance")),
    # --- mixed precision to a target size (quant.target_bpw / target_size_mb) ---
    Case("target-size-on-an-int-run",
         (W4, *_sets("quant.target_size_mb=1", "export=[{kind: compressed-tensors}]")),
         ("quant.target_size_mb", "not a key of quant.format int")),
    # int grids to a target (quant.format int, compressed-tensors config groups)
    Case("int-target-with-awq-gemm", (W4, *_sets("quant.target_bpw=5")),
         ("export[0] (awq-gemm)", "quant.target_bpw", "one scheme")),
    Case("int-target-without-compressed-tensors",
         (W4, *_sets("quant.target_bpw=5", "export=[]")),
         ("quant.target_bpw", "no compressed-tensors export")),
    Case("int-target-candidate-fits-no-width",
         (W4, *_sets("quant.target_bpw=5", INT_CT,
                     "quant.candidates=[{bits: 4, group_size: 32}, {bits: 8, group_size: 256}]")),
         ("quant.candidates[1]", "int8 g256 asym", "fits no linear", "64, 128")),
    Case("int-target-candidate-bits-compressed-tensors-cannot-pack",
         (W4, *_sets("quant.target_bpw=5", INT_CT,
                     "quant.candidates=[{bits: 4, group_size: 32}, {bits: 3, group_size: 32}]")),
         ("export[0] (compressed-tensors)", "quant.candidates[1]", "bits 3")),
    Case("int-target-bpw-below-the-smallest-candidate",
         (W4, *_sets("quant.target_bpw=3", INT_CT)),
         ("quant.target_bpw", INT_RANGE)),
    Case("int-target-bpw-above-the-largest-candidate",
         (W4, *_sets("quant.target_bpw=12", INT_CT)),
         ("quant.target_bpw", INT_RANGE)),
    Case("int-target-candidate-group-size-invalid",
         (W4, *_sets("quant.target_bpw=5", INT_CT, "quant.candidates=[{bits: 4, group_size: 0}]")),
         ("quant.candidates[0].group_size", "positive group size")),
    Case("target-bpw-and-size-both",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 6, target_size_mb: 1"), TARGET_EXPORT)),
         ("quant.target_bpw or quant.target_size_mb",)),
    Case("target-bpw-below-the-smallest-candidate",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 3"), TARGET_EXPORT)),
         ("quant.target_bpw", "4.500 to 8.500 bits per weight")),
    Case("target-bpw-above-the-largest-candidate",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 9"), TARGET_EXPORT)),
         ("quant.target_bpw", "4.500 to 8.500 bits per weight")),
    Case("target-size-below-the-smallest-file",
         (W4, *_sets(TARGET_RUN.format("target_size_mb: 0.01"), TARGET_EXPORT)),
         ("quant.target_size_mb", "MB for the whole file")),
    Case("target-bpw-not-positive",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 0"), TARGET_EXPORT)),
         ("quant.target_bpw",)),
    Case("target-candidate-unknown",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 6, candidates: [Q4_0, Q7_0]"),
                     TARGET_EXPORT)),
         ("quant.candidates[1]", "Q7_0")),
    Case("target-candidate-fits-no-width",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 6, candidates: [Q4_0, Q4_K]"),
                     TARGET_EXPORT)),
         ("quant.candidates[1]", "Q4_K", "fits no linear")),
    Case("target-without-a-target-export",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 6"), "export=[{kind: gguf, types: [Q8_0]}]")),
         ("quant.target_bpw", "types: [target]")),
    Case("target-export-without-a-target",
         (W4, *_sets(GGUF_RUN, TARGET_EXPORT)),
         ("export[0].types[0]", "quant.target_bpw or quant.target_size_mb")),
    Case("target-export-listed-twice",
         (W4, *_sets(TARGET_RUN.format("target_bpw: 6"), "export=[{kind: gguf, types: [target]},"
                     " {kind: gguf, name: g2, types: [target]}]")),
         ("export[1]", "llama_w4-target.gguf")),
    # --- keys a format does not have (they would be ignored) ---
    Case("gguf-format-has-no-bits", (W4, *_sets("quant={format: gguf, bits: 4}")),
         ("quant.bits", "not a key of quant.format gguf", "gguf_mix")),
    Case("gguf-format-has-no-group-size", (W4, *_sets("quant={format: gguf, group_size: 32}")),
         ("quant.group_size", "not a key of quant.format gguf")),
    Case("gguf-format-has-no-symmetric", (W4, *_sets("quant={format: gguf, symmetric: true}")),
         ("quant.symmetric", "not a key of quant.format gguf")),
    Case("gguf-export-has-no-bits", (W4, *_sets("export=[{kind: gguf, bits: 4}]")),
         ("export[0].bits", "not a key of export kind gguf", "types")),
    # --- threads: 1 .. 4 per usable CPU; left out, torch's default ---
    Case("threads-negative", (W4, *_sets("threads=-1")), ("threads", "at least 1")),
    Case("threads-zero", (W4, *_sets("threads=0")), ("threads", "at least 1")),
    Case("threads-oversubscribed", (W4, *_sets(f"threads={4 * usable_cpus() + 1}")),
         ("threads", "oversubscribes")),
    # --- windows against the text and the model's context ---
    Case("calibration-more-than-the-text", (W4, *_sets("calibration.n_samples=100000")),
         ("calibration.n_samples", "{text}", "too short")),
    Case("evaluation-more-than-the-text", (W4, *_sets("evaluation.n_windows=100000")),
         ("evaluation.n_windows", "{text}", "too short")),
    Case("calibration-longer-than-context", (W4, *_sets("calibration.seq_len=4096")),
         ("calibration.seq_len", "max_position_embeddings 256", "{model}/config.json")),
    Case("evaluation-longer-than-context", (W4, *_sets("evaluation.seq_len=4096")),
         ("evaluation.seq_len", "max_position_embeddings 256")),
    Case("calibration-seq-len-too-short", (W4, *_sets("calibration.seq_len=4")),
         ("calibration.seq_len",)),
    Case("evaluation-batch-size-zero", (W4, *_sets("evaluation.batch_size=0")),
         ("evaluation.batch_size",)),
    # --- awq values out of range ---
    Case("awq-n-grid-zero", (W4, *_sets("awq.n_grid=0")), ("awq.n_grid",)),
    Case("awq-clip-n-grid-one", (W4, *_sets("awq.clip_n_grid=1")), ("awq.clip_n_grid",)),
    Case("awq-clip-shrink-out-of-range", (W4, *_sets("awq.clip_max_shrink=1.5")),
         ("awq.clip_max_shrink",)),
    Case("awq-search-tokens-too-few", (W4, *_sets("awq.search_n_tokens=8")),
         ("awq.search_n_tokens",)),
    Case("awq-search-grid-unknown", (W4, *_sets("awq.search_grid=coarse")),
         ("awq.search_grid", "refine", "full")),
    Case("awq-key-unknown", (W4, *_sets("awq.grid=4")), ("awq.grid", "n_grid")),
    # --- paths are not hub ids (item 6) ---
    Case("model-source-org-name-missing", (W4, *_sets("model.source=models/m")),
         ("model.source 'models/m'", "no such file or folder")),
    Case("model-source-gguf-name-missing", (W4, *_sets("model.source=no_such.gguf")),
         ("model.source 'no_such.gguf'", "no such file or folder")),
    Case("model-source-bare-name-missing", (W4, *_sets("model.source=mymodel")),
         ("model.source 'mymodel'", "no such file or folder", "org/name")),
    Case("data-source-path-missing", (W4, *_sets("data.source=data/x.jsonl")),
         ("data.source 'data/x.jsonl'", "no such file or folder")),
    Case("data-source-hub-id-not-fetched",
         (W4, *_sets("data.source=llmquant-no-such-org/no-such-text")),
         ("data.source 'llmquant-no-such-org/no-such-text'", "no such file or folder here")),
    Case("data-file-empty", (W4, *_sets("data.source={root}/empty.jsonl")),
         ("{root}/empty.jsonl", "empty"), prepare=_write("empty.jsonl", "")),
    Case("data-file-bad-json-line", (W4, *_sets("data.source={root}/bad.jsonl")),
         ("{root}/bad.jsonl:3", "not valid JSON"),
         prepare=_write("bad.jsonl", '{"text": "a b"}\n\n{"text": "c d" \n')),
    Case("data-file-record-without-text-field", (W4, *_sets("data.source={root}/nokey.jsonl")),
         ("{root}/nokey.jsonl:2", "'text'", "data.text_field"),
         prepare=_write("nokey.jsonl", '{"text": "a b"}\n{"body": "c d"}\n')),
    Case("data-text-field-absent", (W4, *_sets("data.text_field=body")),
         ("{text}:1", "'body'", "data.text_field")),
    Case("data-file-only-blank-texts", (W4, *_sets("data.source={root}/blank.jsonl")),
         ("{root}/blank.jsonl", "no text"),
         prepare=_write("blank.jsonl", '{"text": ""}\n{"text": "  "}\n')),
    Case("data-file-json-array-item-not-object", (W4, *_sets("data.source={root}/a.json")),
         ("{root}/a.json: item 1", "JSON object"), prepare=_write("a.json", '[{"text": "x"}, 3]')),
    Case("data-file-type-unsupported", (W4, *_sets("data.source={root}/docs.csv")),
         ("{root}/docs.csv", "unsupported"), prepare=_write("docs.csv", "text\na b\n")),
    # --- the evaluator (item 7) ---
    Case("eval-model-path-missing",
         ("--baseline", "{model}", "--model", "q={root}/nope", *EVAL),
         ("models[0].path", "{root}/nope", "no such file or folder"), tool="eval"),
    Case("eval-baseline-path-missing", ("--baseline", "{root}/nope", *EVAL),
         ("baseline.path", "{root}/nope"), tool="eval"),
    Case("eval-model-not-a-model-folder",
         ("--baseline", "{model}", "--model", "q={root}/notmodel", *EVAL),
         ("models[0].path", "{root}/notmodel/config.json"), tool="eval", prepare=_not_a_model),
    Case("eval-gguf-baseline-is-read-as-a-model",
         ("--baseline", "{root}/m.gguf", "--text", "{text}", "--seq-len", "1000", "--out",
          "{out}"),
         ("windows.seq_len", "max_position_embeddings 256"), tool="eval",
         prepare=_gguf_of_model),
    Case("eval-seq-len-beyond-context",
         ("--baseline", "{model}", "--text", "{text}", "--seq-len", "1000", "--out", "{out}"),
         ("windows.seq_len", "max_position_embeddings 256", "{model}/config.json"), tool="eval"),
    Case("eval-job-key-unknown", ("{root}/job.yaml", "--out", "{out}"),
         ("{root}/job.yaml", "models[0].pathx", "name, path, dequantize"), tool="eval",
         prepare=_write("job.yaml", "name: j\nmodels: [{name: a, path: x, pathx: y}]\n")),
    Case("eval-job-top-key-unknown", ("{root}/job.yaml", "--out", "{out}"),
         ("baselin", "not a key"), tool="eval",
         prepare=_write("job.yaml", "name: j\nbaselin: {name: b, path: x}\n")),
    Case("eval-data-path-missing",
         ("--baseline", "{model}", "--text", "data/x.jsonl", "--seq-len", "16", "--out",
          "{out}"),
         ("text.source 'data/x.jsonl'", "no such file or folder"), tool="eval"),
]  # fmt: skip



def _poison(tensor: str, value: float, folder: str = "model") -> Callable[[Env], None]:
    """A prepare step putting ``value`` (NaN, Inf) into one element of ``tensor`` of the row's
    model copy (``folder`` another than ``model``: a second copy made for the row)."""

    def prepare(env: Env) -> None:
        from safetensors.torch import load_file, save_file

        target = env.root / folder
        if not target.exists():
            shutil.copytree(env.model, target)
        state = load_file(str(target / "model.safetensors"))
        state[tensor].view(-1)[5] = value
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})

    return prepare


CASES_STATE += [
    Case(
        "two-gguf-exports-write-the-same-file",
        (W4, *_sets("export=[{kind: gguf, types: [Q8_0]}, {kind: gguf, name: g2, types: [Q8_0]}]")),
        ("export[1]", "llama_w4-Q8_0.gguf", "export[0]"),
    ),
    Case(
        "export-name-is-a-gguf-file-of-another",
        (W4, *_sets("export=[{kind: gguf, types: [Q8_0]}, "
                    "{kind: compressed-tensors, name: llama_w4-Q8_0.gguf}]")),
        ("export[1]", "llama_w4-Q8_0.gguf"),
    ),  # fmt: skip
]

DOWN = "model.layers.1.mlp.down_proj.weight"
# Non-finite values (item 1): a damaged checkpoint is bad input, named before any work.
CASES_VALUES: list[Case] = [
    Case("inf-in-a-block-weight", (W4,), (DOWN, "1 Inf"), prepare=_poison(DOWN, float("inf"))),
    Case("nan-in-a-block-weight", (W4,), (DOWN, "1 NaN"), prepare=_poison(DOWN, float("nan"))),
    Case("nan-in-the-embedding", (W4,), ("model.embed_tokens.weight", "1 NaN"),
         prepare=_poison("model.embed_tokens.weight", float("nan"))),  # fmt: skip
    Case("nan-in-a-gguf-run-weight", ("recipes/llama_w4_gguf.yaml", *_sets(
             "model.source={model}", "data.source={text}", "calibration.n_samples=2",
             "calibration.seq_len=16", "evaluation.enabled=false")),
         (DOWN, "NaN"), prepare=_poison(DOWN, float("nan")), tiny=False),  # fmt: skip
    Case("eval-baseline-with-nan-weights", ("--baseline", "{model}", *EVAL), (DOWN, "NaN"),
         tool="eval", prepare=_poison(DOWN, float("nan"))),  # fmt: skip
    Case("eval-model-with-inf-weights",
         ("--baseline", "{model}", "--model", "bad={root}/bad", *EVAL), (DOWN, "Inf", "bad"),
         tool="eval", prepare=_poison(DOWN, float("inf"), folder="bad")),  # fmt: skip
]

CASES = [*CASES, *CASES_FILES, *CASES_STATE, *CASES_INPUTS, *CASES_VALUES]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    return make_model(root / "model", "llama"), make_text_file(root / "docs.jsonl")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, pristine, tmp_path, capsys, monkeypatch):
    import torch

    if "cuda" in " ".join(case.argv) and torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda is not bad input here")
    model, text = pristine
    env = Env(tmp_path, tmp_path / "model", tmp_path / "docs.jsonl", tmp_path / "out")
    shutil.copytree(model, env.model)
    shutil.copy(text, env.text)
    env.out.mkdir()
    (env.out / "keep.txt").write_text("a file the user had here")
    if case.prepare:
        case.prepare(env)
    if case.fault:
        case.fault(env, monkeypatch)
    before = _state(env.out)
    fill = {"model": env.model, "text": env.text, "out": env.out, "root": env.root}
    argv = [_fill(a, fill) for a in case.argv]
    if case.tool == "run":
        if case.tiny:
            argv[1:1] = _sets(*TINY, f"model.source={env.model}", f"data.source={env.text}")
        if "--out" not in argv:
            argv += ["--out", str(env.out)]
        code = run_cli.main(argv)
    else:
        code = eval_cli.main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err[-3000:]
    for culprit in case.named:
        assert _fill(culprit, fill) in err, f"{culprit!r} not named in: {err[-3000:]}"
    after = {k: v for k, v in _state(env.out).items() if Path(k).parts[0] not in case.kept}
    assert after == before, "the output folder changed"


def test_a_non_finite_result_of_ours_is_exit_1_naming_block_and_linear(
    pristine, tmp_path, capsys, monkeypatch
):
    """A NaN that llmquant itself makes (here: injected into one linear's rounding) is an
    internal failure naming where it came from; nothing is exported and no report is written."""
    from llmquant.quant.quantizers import IntQuantizer

    real = IntQuantizer.fake_quant
    calls = {"n": 0}

    def fake_quant(self, w, importance=None, clip=None):
        out = real(self, w, importance, clip)
        if w.shape == (64, 128):  # down_proj [hidden, intermediate]
            calls["n"] += 1
            out = out.clone()
            out[0, 0] = float("nan")
        return out

    monkeypatch.setattr(IntQuantizer, "fake_quant", fake_quant)
    model, text = pristine
    out = tmp_path / "out"
    sets = _sets(*TINY, f"model.source={model}", f"data.source={text}", "awq.enabled=false")
    code = run_cli.main(["recipes/llama_w4.yaml", *sets, "--out", str(out)])
    err = capsys.readouterr().err
    assert calls["n"] > 0
    assert code == 1, err[-2000:]
    assert "block 0, model.layers.0.mlp.down_proj" in err and "quantized weight" in err
    assert not (out / "report.json").exists() and not (out / "compressed-tensors").exists()


@pytest.mark.parametrize(
    "compute, code, named",
    [("float32", 1, "perplexity baseline is nan"), ("bfloat16", 2, "runtime.compute_dtype")],
)
def test_a_nan_perplexity_never_exits_0(
    pristine, tmp_path, capsys, monkeypatch, compute, code, named
):
    """float32: an internal failure; a narrow compute dtype: the user's choice, exit 2."""
    from llmquant import pipeline
    from llmquant.evaluate.perplexity import PerplexityResult

    real = pipeline.perplexity_from_hidden
    monkeypatch.setattr(
        pipeline,
        "perplexity_from_hidden",
        lambda *a: PerplexityResult(**{**real(*a).__dict__, "ppl": float("nan")}),
    )
    model, text = pristine
    out = tmp_path / "out"
    sets = _sets(*TINY, f"model.source={model}", f"data.source={text}", "awq.enabled=false",
                 f"runtime.compute_dtype={compute}")  # fmt: skip
    got = run_cli.main(["recipes/llama_w4.yaml", *sets, "--out", str(out)])
    err = capsys.readouterr().err
    assert got == code and named in err, err[-2000:]
    assert not (out / "report.json").exists()
