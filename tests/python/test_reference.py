"""The reference runner (export/reference.py) and the shared input readers (export/io.py), on tiny.

Set ICL_TINY_DIR to reuse a built `python -m export.standins tiny --out DIR`; otherwise it is built
once for this module (about 20 seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from export import io, reference, standins

ROOT = Path(__file__).resolve().parents[2]

EXAMPLES_FILE = ROOT / "tests" / "data" / "flagembedding-icl-examples" / "MTEB" / "ArguAna.json"
TASK = "Given a claim, find documents that refute the claim."
DOCS = [
    "The cat sat on the mat.",
    "",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "  leading spaces and trailing ones  ",
    "naïve café, 東京, emoji 🙂 and <instruct> typed by a user",
    "short",
    "A much longer passage about markets. " * 20,
]
QUERIES = ["what is a cat?", "hello world", "<query>nested markers\n<response>", "12345 numbers"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, cached) -> Path:
    if (built := cached("ICL_TINY_DIR")) is not None:
        return built
    return standins.build("tiny", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def examples() -> list[dict[str, str]]:
    return [dict(e, instruct=TASK) for e in io.read_examples(EXAMPLES_FILE)]


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    return AutoTokenizer.from_pretrained(tiny)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export.reference", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_cli_documents(tiny, tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    result = run_cli(
        "--model",
        str(tiny),
        "--input",
        str(tmp_path / "docs.txt"),
        "--output",
        str(tmp_path / "out.npy"),
        "--ids",
        str(tmp_path / "ids.jsonl"),
        "--batch-size",
        "3",
    )
    assert result.returncode == 0, result.stderr
    embeddings = np.load(tmp_path / "out.npy")
    assert embeddings.shape == (len(DOCS), 64) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "ids.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(DOCS)))
    for row in rows:
        assert row["ids"][0] == 1 and row["ids"][-1] == 2
        assert row["ids"].count(2) == 1
    assert rows[1]["ids"] == [1, 2]
    # Distinct texts give distinct embeddings (the tiny model is not degenerate).
    cosines = embeddings @ embeddings.T
    assert cosines[np.triu_indices(len(DOCS), 1)].max() < 0.99


def test_order_is_input_order(tiny):
    embeddings, ids = reference.reference_embed(tiny, DOCS, queries=False, batch_size=2)
    order = [5, 2, 0, 6, 3, 1, 4]
    shuffled, shuffled_ids = reference.reference_embed(tiny, [DOCS[i] for i in order], queries=False, batch_size=2)
    np.testing.assert_allclose(shuffled, embeddings[order], atol=1e-5)
    assert shuffled_ids == [ids[i] for i in order]
    # A text embedded alone gives the same row as in a batch (left padding is masked out).
    alone, _ = reference.reference_embed(tiny, [DOCS[2]], queries=False)
    np.testing.assert_allclose(alone[0], embeddings[2], atol=1e-5)


def test_document_ids_are_the_plain_tokenization(tiny, tokenizer):
    _, ids = reference.reference_embed(tiny, DOCS, queries=False)
    assert ids == [tokenizer(d)["input_ids"] for d in DOCS]


def test_query_ids_hold_prefix_and_suffix(tiny, tokenizer, examples):
    embeddings, ids = reference.reference_embed(tiny, QUERIES, queries=True, task=TASK, examples=examples)
    assert embeddings.shape == (len(QUERIES), 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    prefix = "\n\n".join(f"<instruct>{TASK}\n<query>{e['query']}\n<response>{e['response']}" for e in examples) + "\n\n"
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    # The suffix "\n<response>" as it tokenizes after text: "\n" is <0x0A> (13), no "▁" before it.
    tail = [13, 32002, 2]
    for query, row in zip(QUERIES, ids):
        assert row[0] == 1
        assert row[1 : 1 + len(prefix_ids)] == prefix_ids
        assert row[-3:] == tail
        middle = tokenizer.decode(row[1 + len(prefix_ids) : -3])
        assert middle == f"<instruct>{TASK}\n<query>{query}"


def test_queries_without_task_or_examples(tiny, tokenizer):
    _, ids = reference.reference_embed(tiny, ["hello world"], queries=True)
    assert ids[0][0] == 1
    assert tokenizer.decode(ids[0][1:]) == "hello world\n<response></s>"


def test_examples_with_their_own_instruct_need_no_task(tiny, tokenizer, examples):
    _, ids = reference.reference_embed(tiny, ["hello"], queries=True, examples=examples)
    text = tokenizer.decode(ids[0])
    assert "None" not in text and text.count("<instruct>") == len(examples)
    assert text.endswith("\n\nhello\n<response></s>")


def test_truncation(tiny, tokenizer):
    long = "word " * 300
    _, doc_ids = reference.reference_embed(tiny, [long], queries=False, max_length=32)
    assert len(doc_ids[0]) == 32 and doc_ids[0][0] == 1 and doc_ids[0][-1] == 2
    _, query_ids = reference.reference_embed(tiny, [long], queries=True, task=TASK, max_length=32)
    row = query_ids[0]
    assert len(row) <= 32 and row[0] == 1 and row[-3:] == [13, 32002, 2]
    assert tokenizer.decode(row).startswith(f"<s><instruct>{TASK}")


def test_refuses_examples_without_instruct_and_no_task(tiny, tmp_path):
    bare = io.read_examples(EXAMPLES_FILE)
    assert all("instruct" not in e for e in bare)
    with pytest.raises(reference.ReferenceError, match="None"):
        reference.reference_embed(tiny, ["q"], queries=True, examples=bare)
    (tmp_path / "q.txt").write_text("q\n")
    result = run_cli(
        "--model",
        str(tiny),
        "--input",
        str(tmp_path / "q.txt"),
        "--output",
        str(tmp_path / "o.npy"),
        "--queries",
        "--examples",
        str(EXAMPLES_FILE),
    )
    assert result.returncode == 2 and "instruct" in result.stderr
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"texts": [], "queries": False}, "no input"),
        ({"texts": ["x"], "queries": False, "task": "t"}, "queries only"),
        ({"texts": ["x"], "queries": True, "task": "t", "examples": []}, "empty"),
    ],
)
def test_refused_requests(kwargs, match):
    with pytest.raises(reference.ReferenceError, match=match):
        reference.check_request(kwargs["texts"], kwargs["queries"], kwargs.get("task"), kwargs.get("examples"))


def test_cli_refuses_task_for_documents(tiny, tmp_path):
    (tmp_path / "d.txt").write_text("x\n")
    result = run_cli(
        "--model", str(tiny), "--input", str(tmp_path / "d.txt"), "--output", str(tmp_path / "o.npy"), "--task", "t"
    )
    assert result.returncode == 2 and "--queries" in result.stderr


def test_check_ids_catches_a_mismatch():
    ids = [[1, 5, 2], [1, 2]]
    fed = (torch.tensor([[1, 5, 2], [0, 1, 2]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    reference.check_ids(ids, [fed, fed], 2)  # the probe batch plus the real one
    with pytest.raises(reference.ReferenceError, match="differ"):
        reference.check_ids([[1, 6, 2], [1, 2]], [fed], 2)
    with pytest.raises(reference.ReferenceError, match="recorded"):
        reference.check_ids([[1, 2]], [fed], 2)


# --- export/io.py ----------------------------------------------------------------------------------


def test_read_texts_plain_lines(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"one\r\ntwo\n\nfour  \n")
    assert io.read_texts(path) == ["one", "two", "", "four  "]
    path.write_bytes(b"no final newline")
    assert io.read_texts(path) == ["no final newline"]
    path.write_bytes(b"")
    assert io.read_texts(path) == []
    path.write_bytes(b'{"text": "a json line in a .txt file stays text"}\n')
    assert io.read_texts(path) == ['{"text": "a json line in a .txt file stays text"}']


def test_read_texts_json_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a", "id": 1}\n\n{"text": "b\\nc", "other": "x"}\n', encoding="utf-8")
    assert io.read_texts(path) == ["a", "b\nc"]
    path.write_text('{"body": "a"}\n', encoding="utf-8")
    assert io.read_texts(path, field="body") == ["a"]
    with pytest.raises(ValueError, match=r"in.jsonl:1: no field 'text'"):
        io.read_texts(path)
    path.write_text('{"text": "a"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r":2: field 'text' is int"):
        io.read_texts(path)
    path.write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r":2: not valid JSON"):
        io.read_texts(path)
    ndjson = tmp_path / "in.ndjson"
    ndjson.write_text('["a"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r":1: expected a JSON object"):
        io.read_texts(ndjson)


def test_read_examples(tmp_path):
    examples = io.read_examples(EXAMPLES_FILE)
    assert len(examples) == 3 and all(set(e) == {"query", "response"} for e in examples)
    lines = tmp_path / "ex.jsonl"
    lines.write_text('{"query": "q", "response": "r", "instruct": "i", "extra": 1}\n', encoding="utf-8")
    assert io.read_examples(lines) == [{"query": "q", "response": "r", "instruct": "i"}]
    bad = tmp_path / "bad.json"
    for content, match in [
        ('{"query": "q"}', "expected a JSON list"),
        ('["x"]', "example 0: expected an object"),
        ('[{"query": "q", "response": "r"}, {"query": "q"}]', "example 1: missing 'response'"),
        ('[{"query": 1, "response": "r"}]', "example 0: 'query' is int"),
        ('[{"query": "q", "response": "r", "instruct": null}]', "example 0: 'instruct' is NoneType"),
        ("[", "not valid JSON"),
    ]:
        bad.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=match):
            io.read_examples(bad)
