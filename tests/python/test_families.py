"""Model families (issue 27): Qwen3-Embedding and e5-mistral through the exporter.

The Qwen tokenizer built from `qwen.tiktoken` against tiktoken itself; the format-2 manifest of each
family; the exported fp32 graph of the Qwen3 stand-in against sentence-transformers (the model
card's pipeline) and sentence-transformers against the card's transformers code; e5's package
against its card's code; and the golden dirs' ids against the procedure the manifest declares
(what the runtime implements: `special_tokens.prepend` + the template's ids + `append`).

Set ICL_QWEN3_TINY_DIR / ICL_QWEN3_TINY_PKG / ICL_E5_TINY_DIR / ICL_E5_TINY_PKG to reuse what
tests/fixtures.sh built; otherwise they are built here (about a minute).
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer

from export import cards, family, standins
from export.ortrun.batch import last_token, right_padded
from export.ortrun.session import onnx_hidden, session

ROOT = Path(__file__).resolve().parents[2]
QWEN3 = family.load("qwen3-embedding")
E5 = family.load("e5-mistral")
TASK = "Given a claim, find documents that refute the claim"

# Texts around the prompt's edges: Qwen3's "Query:" has no space before the query, so the colon and
# the query's first characters can form one token ("://" below): a query is tokenized as one text.
MERGING = "//example.com/path"
QUERIES = [MERGING, "how much protein should a female eat", "  leading and trailing  ", "Ünïcödé café", "12345", ""]
DOCUMENTS = [
    "Paris is the capital of France.",
    "line one\nline two\r\n\r\n  indented",
    "text with <|endoftext|> inside and <|im_start|>user",
    "数字 12345 and émojis 🙂 café",
    "",
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def build(tmp_path_factory, cached, env: str, argv: list[str], name: str, kind: str) -> Path:
    if (built := cached(env)) is not None:
        return built
    out = tmp_path_factory.mktemp(kind) / name
    result = run(*argv, "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, cached) -> Path:
    return build(tmp_path_factory, cached, "ICL_QWEN3_TINY_DIR", ["-m", "export.standins", "qwen3-tiny"], "q", "m")


@pytest.fixture(scope="session")
def qwen3_pkg(tmp_path_factory, cached, qwen3_dir) -> Path:
    argv = ["-m", "export", "--model", str(qwen3_dir), "--variants", "fp32"]
    return build(tmp_path_factory, cached, "ICL_QWEN3_TINY_PKG", argv, "q", "pkg")


@pytest.fixture(scope="session")
def e5_dir(tmp_path_factory, cached) -> Path:
    return build(tmp_path_factory, cached, "ICL_E5_TINY_DIR", ["-m", "export.standins", "e5-tiny"], "e5", "m")


@pytest.fixture(scope="session")
def e5_pkg(tmp_path_factory, cached, e5_dir) -> Path:
    argv = ["-m", "export", "--model", str(e5_dir), "--variants", "fp32", "--family", "e5-mistral"]
    return build(tmp_path_factory, cached, "ICL_E5_TINY_PKG", argv, "e5", "pkg")


def manifest_of(pkg: Path) -> dict:
    return json.loads((pkg / "embedder.json").read_text(encoding="utf-8"))


def procedure_ids(pkg: Path, text: str, queries: bool, task: str | None = None, max_length: int | None = None):
    """A row's ids as the manifest declares them (the contract the runtime implements): for a query,
    the template filled with the task (or the default task); one tokenization without special tokens,
    cut from the right, between `prepend` and `append`."""
    meta = manifest_of(pkg)
    prompt, special = meta["prompt"], meta["special_tokens"]
    assert prompt["procedure"] == "instruct"
    if queries and (task or prompt["default_task"]) is not None:
        text = prompt["query"].format(task=task or prompt["default_task"], query=text)
    limit = max_length or meta["max_length"]["query" if queries else "document"]
    ids = Tokenizer.from_file(str(pkg / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    return special["prepend"] + ids[: limit - len(special["prepend"]) - len(special["append"])] + special["append"]


def onnx_embed(pkg: Path, rows: list[list[int]]) -> np.ndarray:
    meta = manifest_of(pkg)
    batch = right_padded(rows, meta["special_tokens"]["pad_id"])
    pooled = last_token(onnx_hidden(session(pkg / "fp32" / "model.onnx", 2), batch), batch.attention_mask)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())


# --- the Qwen tokenizer ------------------------------------------------------------------------------


def test_qwen_tokenizer_reproduces_tiktoken():
    """The BPE converted from qwen.tiktoken gives tiktoken's own ids (with Qwen's regex, after NFC,
    special tokens allowed in the text), and appends <|endoftext|> with special tokens."""
    ranks = load_tiktoken_bpe(str(standins.qwen_ranks_file()))
    assert len(ranks) == standins.QWEN_RANKS
    special = {t: standins.QWEN_RANKS + i for i, t in enumerate(standins.QWEN_SPECIAL)}
    enc = tiktoken.Encoding("qwen", pat_str=standins.QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    tokenizer = standins.qwen_tokenizer()
    texts = (
        QUERIES
        + DOCUMENTS
        + [
            "Instruct: Given a web search query\nQuery:what is rust",
            "don't I'LL we've they'RE",
            "tabs\tand\u00a0non-breaking\u2003spaces   \n\n\n",
            "e\u0301 composed by NFC, ﬁ ligature kept",
            "x" * 300 + " 1234567890",
            "<|im_start|>system\nYou are<|im_end|><think></think>",
        ]
    )
    for text in texts:
        want = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == want, text
        assert tokenizer(text)["input_ids"] == want + [special["<|endoftext|>"]], text
    assert len(tokenizer) == standins.QWEN_VOCAB == 151669
    assert [tokenizer.convert_tokens_to_ids(t) for t in standins.QWEN_SPECIAL] == list(range(151643, 151669))
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("<|endoftext|>", "<|im_end|>", "left")
    assert tokenizer.decode(tokenizer("Héllo  wörld 🙂")["input_ids"]) == "Héllo  wörld 🙂<|endoftext|>"


# --- families and the format-2 manifest --------------------------------------------------------------


def test_family_recipes():
    assert family.names() == ["bge-en-icl", "e5-mistral", "qwen3-embedding"]
    bge = family.load("bge-en-icl")
    assert bge.prompt["default_task"] is None and bge.dimensions is None and bge.max_length["query"] == 512
    assert QWEN3.prompt == {
        "procedure": "instruct",
        "query": "Instruct: {task}\nQuery:{query}",
        "default_task": "Given a web search query, retrieve relevant passages that answer the query",
    }
    assert QWEN3.dimensions == {"min": 32} and QWEN3.max_length == {"query": 8192, "document": 8192}
    assert E5.prompt["query"] == "Instruct: {task}\nQuery: {query}" and E5.append_eos
    assert E5.max_length == {"query": 4096, "document": 4096} and E5.dimensions is None
    assert QWEN3.query_text("q", None) == "Instruct: " + QWEN3.prompt["default_task"] + "\nQuery:q"
    with pytest.raises(ValueError, match="unknown model family"):
        family.load("nope")


def test_family_detection(qwen3_dir, e5_dir):
    q = family.detect(AutoConfig.from_pretrained(qwen3_dir), AutoTokenizer.from_pretrained(qwen3_dir))
    assert q.name == "qwen3-embedding"
    with pytest.raises(ValueError, match="--family"):
        family.detect(AutoConfig.from_pretrained(e5_dir), AutoTokenizer.from_pretrained(e5_dir))


def test_export_without_family_refuses_an_unknown_model(e5_dir, tmp_path):
    result = run("-m", "export", "--model", str(e5_dir), "--out", str(tmp_path / "p"), "--variants", "fp32")
    assert result.returncode == 1 and "--family" in result.stderr
    assert not (tmp_path / "p").exists()


def test_qwen3_manifest(qwen3_pkg):
    meta = manifest_of(qwen3_pkg)
    assert meta["format"] == "icl-embed/2"
    assert meta["source"]["family"] == "qwen3-embedding" and meta["source"]["architecture"] == "Qwen3Model"
    assert meta["prompt"] == QWEN3.prompt and meta["dimensions"] == {"min": 32}
    assert meta["max_length"] == {"query": 8192, "document": 8192}
    special = meta["special_tokens"]
    assert (special["prepend"], special["append"], special["pad_id"]) == ([], [151643], 151643)
    assert special["added"] is None
    arch = meta["architecture"]
    assert (arch["hidden"], arch["heads"], arch["kv_heads"], arch["head_dim"]) == (64, 4, 2, 32)
    assert (arch["vocab"], arch["rope_theta"], arch["sliding_window"]) == (151669, 1e6, None)
    assert meta["pooling"] == "last_token" and meta["padding_side"] == "right"


def test_e5_manifest(e5_pkg):
    meta = manifest_of(e5_pkg)
    assert meta["format"] == "icl-embed/2" and meta["source"]["family"] == "e5-mistral"
    assert meta["prompt"] == E5.prompt and meta["dimensions"] is None
    assert meta["max_length"] == {"query": 4096, "document": 4096}
    special = meta["special_tokens"]
    # The card appends </s> itself: the manifest's append holds it although the tokenizer does not.
    assert (special["prepend"], special["append"], special["added"]) == ([1], [2], None)
    assert meta["architecture"]["vocab"] == 32000 and meta["architecture"]["sliding_window"] == 4096


# --- parity with the model cards' pipelines ---------------------------------------------------------


def test_qwen3_package_matches_sentence_transformers(qwen3_dir, qwen3_pkg):
    """The fp32 graph on the manifest's ids against sentence-transformers (issue 27: ids identical,
    cosine >= 0.99999), documents and queries with a task and with the default task."""
    for texts, queries, task in ((DOCUMENTS, False, None), (QUERIES, True, TASK), (QUERIES, True, None)):
        want, ids = cards.sentence_transformers_embed(qwen3_dir, QWEN3, texts, queries, task)
        rows = [procedure_ids(qwen3_pkg, t, queries, task) for t in texts]
        assert rows == ids
        assert min_cos(onnx_embed(qwen3_pkg, rows), want) >= 0.99999
    # Tokenizing the prompt and the query apart would split the merged "://" token.
    tokenizer = Tokenizer.from_file(str(qwen3_pkg / "tokenizer.json"))
    apart = [tokenizer.encode(QWEN3.query_text("", None), add_special_tokens=False).ids, tokenizer.encode(MERGING).ids]
    assert ids[0] == rows[0] != apart[0] + apart[1]


def test_qwen3_truncation_keeps_the_end_token(qwen3_dir, qwen3_pkg):
    texts = [DOCUMENTS[0] * 20, QUERIES[0] * 10]
    want, ids = cards.sentence_transformers_embed(qwen3_dir, QWEN3, texts, True, TASK, max_length=24)
    assert [len(r) for r in ids] == [24, 24] and {r[-1] for r in ids} == {151643}
    assert [procedure_ids(qwen3_pkg, t, True, TASK, 24) for t in texts] == ids
    assert min_cos(onnx_embed(qwen3_pkg, ids), want) >= 0.99999


def test_sentence_transformers_equals_the_cards_transformers_code(qwen3_dir):
    """The two pipelines of the Qwen3-Embedding card agree (left padding both)."""
    for texts, queries, task in ((DOCUMENTS, False, None), (QUERIES, True, None)):
        st, st_ids = cards.sentence_transformers_embed(qwen3_dir, QWEN3, texts, queries, task)
        card, card_ids = cards.card_embed(qwen3_dir, QWEN3, texts, queries, task)
        assert st_ids == card_ids
        assert min_cos(st, card) >= 0.99999


def test_e5_package_matches_the_card(e5_dir, e5_pkg):
    for texts, queries, task, length in (
        (DOCUMENTS, False, None, None),
        (QUERIES, True, TASK, None),
        (QUERIES, True, None, None),
        ([DOCUMENTS[0] * 20], True, None, 20),
    ):
        want, ids = cards.card_embed(e5_dir, E5, texts, queries, task, length)
        assert all(r[0] == 1 and r[-1] == 2 for r in ids)
        assert [procedure_ids(e5_pkg, t, queries, task, length) for t in texts] == ids
        assert min_cos(onnx_embed(e5_pkg, ids), want) >= 0.99999


@pytest.mark.parametrize(
    ("env", "pkg_env"), [("ICL_GOLDEN_QWEN3_TINY", "ICL_QWEN3_TINY_PKG"), ("ICL_GOLDEN_E5_TINY", "ICL_E5_TINY_PKG")]
)
def test_golden_ids_follow_the_manifest(env, pkg_env, cached, require):
    """Every golden row is what the manifest's procedure gives (what tests/parity.rs checks on the CLI)."""
    golden, pkg = cached(env), cached(pkg_env)
    require(golden is not None and pkg is not None, f"{env} and {pkg_env} are not set (tests/fixtures.sh)")
    for case in json.loads((golden / "cases.json").read_text(encoding="utf-8")):
        assert case["examples"] is None
        texts = [json.loads(line)["text"] for line in (golden / case["input"]).read_text(encoding="utf-8").splitlines()]
        rows = [json.loads(line)["ids"] for line in (golden / f"{case['name']}.ids.jsonl").read_text().splitlines()]
        want = [procedure_ids(pkg, t, case["queries"], case["task"], case["max_length"]) for t in texts]
        assert rows == want, case["name"]
        assert np.load(golden / f"{case['name']}.npy").shape[0] == len(texts)


# --- stand-in configs ----------------------------------------------------------------------------------


def test_qwen3_standin_configs():
    """The published shapes (hidden, layers, heads, head_dim, MLP, vocab, tied) of the 0.6B, 4B, 8B."""
    want = {
        "qwen3-0.6b": (28, 1024, 3072, 16, 8, 128, 151669, True),
        "qwen3-4b": (36, 2560, 9728, 32, 8, 128, 151665, True),
        "qwen3-8b": (36, 4096, 12288, 32, 8, 128, 151665, False),
    }
    for name, shape in want.items():
        assert tuple(standins.QWEN3_SHAPES[name][:8]) == shape, name
    config = standins.qwen3_config(*standins.QWEN3_SHAPES["qwen3-0.6b"])
    assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (1e6, 1e-6, 32768)
    assert config.tie_word_embeddings and not config.attention_bias and config.sliding_window is None
