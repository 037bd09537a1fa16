"""The Python package `icl_embed` (issue 25): the engine in process against the CLI on the same texts
(documents and few-shot queries, tiny and smollm2), token ids against `icl-embed tokenize`, errors of
each kind, and threads (the GIL released while the engine runs; two threads on one embedder and on
two embedders give the serial results).

Needs the package built into the venv (`maturin develop`, tests/run.sh does it), the CLI
(target/debug/icl-embed) and the fixture packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "debug" / "icl-embed"
EXAMPLES = ROOT / "tests" / "data" / "flagembedding-icl-examples" / "MTEB" / "MSMARCO.json"
TASK = "Given a web search query, retrieve relevant passages that answer the query"
DOCS = [
    "Paris is the capital and most populous city of France.",
    "The mitochondrion is the powerhouse of the cell.",
    "Crème brûlée: un dessert à base de crème et de sucre caramélisé.",
    "",
    "short",
    "A much longer passage about rivers. " * 40,
]
QUERIES = ["what is the capital of france", "how do cells make energy", "rivers"]


@pytest.fixture(scope="module")
def icl(require_module):
    return require_module("icl_embed")


@pytest.fixture(scope="module")
def smollm2(require) -> Path:
    require(bool(os.environ.get("ICL_SMOLLM2_PKG")), "ICL_SMOLLM2_PKG is not set (tests/run.sh builds the fixtures)")
    return Path(os.environ["ICL_SMOLLM2_PKG"])


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return json.loads(EXAMPLES.read_text(encoding="utf-8"))[:3]


@pytest.mark.parametrize(("which", "variant"), [("tiny_cli", "fp32"), ("tiny_cli", "int8"), ("smollm2", "fp32")])
def test_documents_and_queries_match_the_cli(icl, request, which, variant, examples, tmp_path, cli_embed, min_cosine):
    package = request.getfixturevalue(which)
    embedder = icl.Embedder(package, variant=variant, device="cpu", threads=1)
    assert embedder.info.variant == variant
    docs = embedder.embed_documents(DOCS)
    assert docs.dtype == np.float32 and docs.shape == (len(DOCS), embedder.info.hidden_size)
    assert docs.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, rtol=1e-5)
    assert min_cosine(docs, cli_embed(package, DOCS, tmp_path, variant)) >= 0.99999

    prompt = embedder.query_prompt(task=TASK, examples=[icl.Example(**e) for e in examples])
    queries = embedder.embed_queries(prompt, QUERIES)
    example_file = tmp_path / "examples.json"
    example_file.write_text(json.dumps(examples), encoding="utf-8")
    reference = cli_embed(package, QUERIES, tmp_path, variant, "--queries", "--task", TASK, "--examples", example_file)
    assert min_cosine(queries, reference) >= 0.99999
    # The prefix was computed once and the queries ran on it; a second call reuses it.
    embedder.embed_queries(prompt, QUERIES[:1])
    stats = embedder.prefix_stats
    assert stats["prefixes"] == 1 and stats["hits"] >= 1 and stats["cached_rows"] + stats["full_rows"] == 4
    # Dicts work as examples too, and give the same prompt.
    again = embedder.embed_queries(embedder.query_prompt(TASK, examples), QUERIES)
    np.testing.assert_array_equal(again, queries)


def test_encoder_ids_match_cli_tokenize(icl, tiny_cli, examples, tmp_path):
    encoder = icl.Encoder(tiny_cli)
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in QUERIES), encoding="utf-8")
    example_file = tmp_path / "examples.json"
    example_file.write_text(json.dumps(examples), encoding="utf-8")

    def tokenize(*extra) -> list[list[int]]:
        out = subprocess.run(
            [BIN, "tokenize", "--model", tiny_cli, "--input", src, *extra], check=True, capture_output=True, text=True
        ).stdout
        return [json.loads(line)["ids"] for line in out.splitlines()]

    assert encoder.documents(QUERIES) == tokenize()
    prompt = encoder.query_prompt(TASK, examples)
    assert encoder.queries(prompt, QUERIES) == tokenize("--queries", "--task", TASK, "--examples", example_file)
    assert prompt.examples == 3 and prompt.task == TASK
    assert all(q[: len(prompt.prefix_ids)] == prompt.prefix_ids for q in encoder.queries(prompt, QUERIES))


def test_inputs_of_every_shape(icl, tiny_cli):
    embedder = icl.Embedder(tiny_cli, variant="fp32", device="cpu", threads=1)
    hidden = embedder.info.hidden_size
    base = embedder.embed_documents(DOCS[:2])
    # A generator, a tuple and a numpy array of strings are iterables like a list.
    np.testing.assert_array_equal(embedder.embed_documents(t for t in DOCS[:2]), base)
    np.testing.assert_array_equal(embedder.embed_documents(np.array(DOCS[:2])), base)
    # A lone str is one document; nothing gives an empty matrix of the right width.
    np.testing.assert_array_equal(embedder.embed_documents(DOCS[0]), base[:1])
    assert embedder.embed_documents([]).shape == (0, hidden)
    # None as the prompt: the package's default task, no examples.
    assert embedder.embed_queries(None, QUERIES).shape == (len(QUERIES), hidden)


def test_errors_keep_their_kind(icl, tiny_cli, smollm2, tmp_path):
    with pytest.raises(icl.PackageError, match="not a directory"):
        icl.Embedder(tmp_path / "missing", device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "embedder.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(icl.PackageError, match="embedder.json"):
        icl.Encoder(broken)
    with pytest.raises(ValueError, match="variant"):
        icl.Embedder(tiny_cli, variant="no such variant!", device="cpu")
    with pytest.raises(ValueError, match="device"):
        icl.Embedder(tiny_cli, device="gpu9")
    with pytest.raises(ValueError, match="threads"):
        icl.Embedder(tiny_cli, device="cpu", threads=0)
    # ONNX Runtime is loaded once per process: a library that cannot load, in a fresh one.
    code = (
        "import sys, icl_embed\n"
        "try:\n"
        f"    icl_embed.Embedder({str(tiny_cli)!r}, device='cpu', ort_lib={str(tmp_path / 'libonnxruntime.so')!r})\n"
        "except icl_embed.RuntimeUnavailableError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "libonnxruntime.so" in proc.stdout
    with pytest.raises(ValueError, match="memory_limit"):
        icl.Embedder(tiny_cli, device="cpu", memory_limit="lots")
    with pytest.raises(MemoryError, match="needs"):
        icl.Embedder(tiny_cli, device="cpu", memory_limit="1K")
    assert issubclass(icl.PackageError, icl.IclEmbedError) and issubclass(icl.IclEmbedError, RuntimeError)

    embedder = icl.Embedder(tiny_cli, variant="fp32", device="cpu", threads=1)
    with pytest.raises(ValueError, match=r"texts\[1\]: expected str, got int"):
        embedder.embed_documents(["fine", 3])
    with pytest.raises(ValueError, match=r"examples\[0\]: missing 'response'"):
        embedder.query_prompt(TASK, [{"query": "q"}])
    with pytest.raises(ValueError, match=r"examples\[1\]: unknown field \"answer\""):
        embedder.query_prompt(TASK, [{"query": "q", "response": "r"}, {"query": "q", "answer": "r"}])
    with pytest.raises(ValueError, match=r"examples\[0\]: expected an Example"):
        embedder.query_prompt(TASK, ["q"])
    other = icl.Encoder(smollm2).query_prompt(TASK)
    with pytest.raises(ValueError, match="made for the package"):
        embedder.embed_queries(other, QUERIES)
    # The embedder still works after each refusal.
    assert embedder.embed_documents(["fine"]).shape[0] == 1


def test_info_says_what_runs(icl, tiny_cli):
    info = icl.Embedder(tiny_cli, device="cpu", threads=1, max_length=64).info
    assert info.device == "cpu" and info.variant in ("fp32", "int8")
    assert info.variant_reason.startswith("auto: ")
    assert info.max_length_documents == info.max_length_queries == 64
    assert info.threads == 1 and info.prefix_cache
    assert info.model in (tiny_cli, tiny_cli.resolve())
    assert info.onnxruntime is not None and "onnxruntime" in info.onnxruntime.name
    assert "variant=" in repr(info)
    asked = icl.Embedder(tiny_cli, variant="fp32", device="cpu", threads=1).info
    assert asked.variant == "fp32" and asked.variant_reason == "asked for"


def test_the_gil_is_released_while_the_engine_runs(icl, smollm2):
    """A pure-Python thread keeps counting while the main thread is inside `embed_documents`."""
    embedder = icl.Embedder(smollm2, variant="fp32", device="cpu", threads=1)
    texts = [DOCS[5]] * 8
    counts = []
    running = threading.Event()
    stop = threading.Event()

    def count():
        n = 0
        running.set()
        while not stop.is_set():
            n += 1
            counts.append(n)

    counter = threading.Thread(target=count)
    counter.start()
    running.wait()
    before = len(counts)
    start = time.perf_counter()
    embedder.embed_documents(texts)
    seconds = time.perf_counter() - start
    during = len(counts) - before
    stop.set()
    counter.join()
    # Holding the GIL for the whole call would leave the counter at a switch interval's worth
    # (5 ms) at most; released, it runs for most of the call.
    assert seconds > 0.05, f"the call took {seconds:.3f}s: too short to tell"
    assert during > 10_000, f"the counter advanced {during} times during a {seconds:.2f}s call"


def test_two_threads_at_once(icl, tiny_cli, examples):
    one = icl.Embedder(tiny_cli, variant="fp32", device="cpu", threads=1)
    two = icl.Embedder(tiny_cli, variant="fp32", device="cpu", threads=1)
    prompt = one.query_prompt(TASK, examples)
    docs = one.embed_documents(DOCS)
    queries = one.embed_queries(prompt, QUERIES)
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(name, fn):
        try:
            for _ in range(5):
                results[name] = fn()
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    jobs = {
        "docs, shared embedder": lambda: one.embed_documents(DOCS),
        "queries, shared embedder": lambda: one.embed_queries(prompt, QUERIES),
        "docs, second embedder": lambda: two.embed_documents(DOCS),
    }
    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    np.testing.assert_allclose(results["docs, shared embedder"], docs, atol=1e-6)
    np.testing.assert_allclose(results["docs, second embedder"], docs, atol=1e-6)
    np.testing.assert_allclose(results["queries, shared embedder"], queries, atol=1e-6)


def _instruct_package(tiny: Path, tmp: Path) -> Path:
    """`tiny` as a format 2 package with the `instruct` procedure, a default task and shortened vectors
    from 8 (issue 27; the same rewrite as tests/common/mod.rs `instruct_package`): links to its files, a
    rewritten manifest (not among the hashed files)."""
    out = tmp / "instruct-pkg"
    out.mkdir()
    for entry in tiny.iterdir():
        if entry.name != "embedder.json":
            (out / entry.name).symlink_to(entry)
    manifest = json.loads((tiny / "embedder.json").read_text(encoding="utf-8"))
    manifest["format"] = "icl-embed/2"
    manifest["prompt"] = {"procedure": "instruct", "query": "Instruct: {task}\nQuery: {query}", "default_task": TASK}
    manifest["dimensions"] = {"min": 8}
    (out / "embedder.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def test_dimensions_shorten_vectors_where_the_package_allows_them(icl, tiny_cli, tmp_path, cli_embed, min_cosine):
    package = _instruct_package(tiny_cli, tmp_path)
    embedder = icl.Embedder(package, variant="fp32", device="cpu", threads=1)
    info = embedder.info
    assert (info.procedure, info.default_task, info.dimensions) == ("instruct", TASK, 8)
    full = embedder.embed_documents(DOCS)
    short = embedder.embed_documents(DOCS, dimensions=8)
    assert short.shape == (len(DOCS), 8) and short.dtype == np.float32
    first = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert min_cosine(short, first) >= 0.99999
    assert min_cosine(short, cli_embed(package, DOCS, tmp_path, "fp32", "--dimensions", "8")) >= 0.99999
    # Queries: the default task when none is given, with examples refused by the procedure.
    prompt = embedder.query_prompt()
    assert prompt.task == TASK and prompt.prefix_ids
    queries = embedder.embed_queries(prompt, QUERIES, dimensions=16)
    reference = cli_embed(package, QUERIES, tmp_path, "fp32", "--queries", "--dimensions", "16")
    assert queries.shape == (len(QUERIES), 16) and min_cosine(queries, reference) >= 0.99999
    with pytest.raises(ValueError, match="takes no few-shot examples"):
        embedder.query_prompt(TASK, [{"query": "q", "response": "r"}])
    for bad in (7, info.hidden_size + 1):
        with pytest.raises(ValueError, match=rf"^dimensions: {bad} is outside 8\.\.={info.hidden_size}"):
            embedder.embed_documents(DOCS, dimensions=bad)
    plain = icl.Embedder(tiny_cli, variant="fp32", device="cpu", threads=1)
    assert (plain.info.procedure, plain.info.default_task, plain.info.dimensions) == ("flagembedding-icl", None, None)
    with pytest.raises(ValueError, match="^dimensions: not supported"):
        plain.embed_queries(None, QUERIES, dimensions=8)
    assert plain.embed_documents(["fine"]).shape == (1, plain.info.hidden_size)
