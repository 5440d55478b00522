from __future__ import annotations

import pytest
from tiny_models import make_documents, make_text_file, make_tokenizer

from llmquant.data import text as textdata


def test_split_is_disjoint_and_deterministic():
    docs = make_documents(300)
    cal, ev = textdata.split_documents(docs, 0.5, seed=0)
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == sorted(set(docs))
    # Independent of input order.
    cal2, ev2 = textdata.split_documents(list(reversed(docs)), 0.5, seed=0)
    assert (cal, ev) == (cal2, ev2)
    cal3, _ = textdata.split_documents(docs, 0.5, seed=1)
    assert cal3 != cal


def test_split_fraction_roughly_respected():
    docs = make_documents(1000)
    _, ev = textdata.split_documents(docs, 0.25, seed=0)
    assert 0.18 < len(ev) / len(set(docs)) < 0.32


def test_windows_shape_and_tokens(tmp_path):
    tok = make_tokenizer(tmp_path)
    docs = make_documents(50)
    windows = textdata.make_windows(tok, docs, 3, 32)
    assert windows.shape == (3, 32)
    expected = []
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    for doc in docs:
        expected += tok(doc, add_special_tokens=False)["input_ids"] + sep
    assert windows.reshape(-1).tolist() == expected[: 3 * 32]


def test_windows_too_short_says_how_many(tmp_path):
    tok = make_tokenizer(tmp_path)
    with pytest.raises(textdata.DataError, match="need 3200 tokens"):
        textdata.make_windows(tok, make_documents(2), 100, 32)


def test_local_jsonl_through_datasets(tmp_path):
    path = make_text_file(tmp_path / "docs.jsonl", 20)
    docs = textdata.load_documents(str(path))
    assert docs == make_documents(20)


def test_missing_column_is_named(tmp_path):
    path = make_text_file(tmp_path / "docs.jsonl", 5)
    with pytest.raises(textdata.DataError, match="'body'"):
        textdata.load_documents(str(path), text_field="body")


def test_missing_file_is_named():
    with pytest.raises(textdata.DataError, match="no such file"):
        textdata.load_documents("./nope/docs.jsonl")


def test_default_wikipedia_text_loads():
    docs = textdata.load_documents("default")
    assert len(docs) > 9000
    cal, ev = textdata.split_documents(docs, 0.5, seed=0)
    assert not set(cal) & set(ev)


class _BosTokenizer:
    """A tokenizer that prepends BOS when encoding but says add_bos_token False (Gemma's, as
    transformers 5 reports it)."""

    bos_token_id = 2
    add_bos_token = False

    def __call__(self, text, add_special_tokens=True):
        def encode(t: str) -> list[int]:
            return ([self.bos_token_id] if add_special_tokens else []) + [
                10 + (ord(c) % 50) for c in t
            ]

        if isinstance(text, list):
            return {"input_ids": [encode(t) for t in text]}
        return {"input_ids": encode(text)}


def test_windows_start_with_bos_when_the_tokenizer_encodes_it():
    docs = make_documents(50)
    windows = textdata.make_windows(_BosTokenizer(), docs, 3, 32)
    assert windows.shape == (3, 32)
    assert windows[:, 0].tolist() == [2, 2, 2]
    assert 2 not in windows[:, 1:].flatten().tolist()


def test_windows_have_no_bos_when_the_tokenizer_adds_none(tmp_path):
    tok = make_tokenizer(tmp_path)
    assert not textdata.adds_bos(tok)
