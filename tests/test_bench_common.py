"""Benchmark steps are reused only when their settings, inputs and code are the same."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
import bench_common  # noqa: E402


def test_a_step_is_reused_only_with_the_same_key_and_code(tmp_path, monkeypatch):
    calls = []

    def step(value):
        calls.append(value)
        return {"value": value, "n": len(calls)}

    path = tmp_path / "step.json"
    monkeypatch.setattr(bench_common, "code_version", lambda: "code-a")
    first = bench_common.cached_step(path, True, step, 1, key={"x": 1})
    assert bench_common.cached_step(path, True, step, 1, key={"x": 1}) == first
    assert len(calls) == 1
    assert bench_common.cached_step(path, True, step, 2, key={"x": 2})["value"] == 2
    assert len(calls) == 2  # other settings: made again
    assert bench_common.cached_step(path, False, step, 2, key={"x": 2})["n"] == 3  # no --reuse
    monkeypatch.setattr(bench_common, "code_version", lambda: "code-b")
    assert bench_common.cached_step(path, True, step, 2, key={"x": 2})["n"] == 4  # other code


def test_digest_follows_content(tmp_path):
    a = torch.arange(6).reshape(2, 3)
    assert bench_common.digest(a) == bench_common.digest(a.clone())
    assert bench_common.digest(a) != bench_common.digest(a.reshape(3, 2))  # [3, 2]
    assert bench_common.digest(a) != bench_common.digest(a + 1)
    text = tmp_path / "t.txt"
    text.write_text("one")
    before = bench_common.digest(text)
    text.write_text("two")
    assert bench_common.digest(text) != before
    assert len(bench_common.code_version()) == 16
