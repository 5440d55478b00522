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
CASES_FILES: list[Case] = []

# Caches, resume and the output folder (items 4 and 5).
CASES_STATE: list[Case] = []

# The recipe checked as a whole, paths, data files and the evaluator (items 2, 6 and 7).
CASES_INPUTS: list[Case] = []

CASES = [*CASES, *CASES_FILES, *CASES_STATE, *CASES_INPUTS]


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
    assert _state(env.out) == before, "the output folder changed"
