"""`icl-embed serve` with the official `openai` client (issue 14): `client.embeddings.create` with float
and base64 encodings and the few-shot extension (`extra_body`), against the CLI's embeddings of the
same texts, and the client's exceptions for refused requests.

Needs the built binary (target/debug/icl-embed) and ICL_TINY_PKG, as tests/run.sh prepares them; without
them the tests skip, or fail under ICL_REQUIRE_FIXTURES=1.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "debug" / "icl-embed"
EXAMPLES = ROOT / "tests" / "data" / "flagembedding-icl-examples" / "MTEB" / "MSMARCO.json"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query."
DOCS = [
    "Paris is the capital and most populous city of France.",
    "The mitochondrion is the powerhouse of the cell.",
    "Crème brûlée: un dessert à base de crème et de sucre caramélisé.",
]
QUERIES = ["what is the capital of france", "how do cells make energy"]
KEY = "test-key"


@pytest.fixture(scope="module")
def package(tiny_cli) -> Path:
    return tiny_cli


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("examples") / "examples.json"
    path.write_text(json.dumps(json.loads(EXAMPLES.read_text(encoding="utf-8"))[:3]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(package):
    """The server on a free loopback port; stopped with SIGTERM, which must exit 0."""
    proc = subprocess.Popen(
        [
            BIN,
            "serve",
            "--model",
            package,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--variant",
            "fp32",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--api-key",
            KEY,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = None
    for line in proc.stderr:
        if line.startswith("listening on "):
            url = line.split()[-1]
            break
    assert url, f"serve exited with {proc.wait()}"
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def cli_embed(package: Path, tmp_path: Path, texts: list[str], *extra: str) -> np.ndarray:
    src, out = tmp_path / "in.txt", tmp_path / "out.npy"
    src.write_text("\n".join(texts), encoding="utf-8")
    subprocess.run(
        [
            BIN,
            "embed",
            "--model",
            package,
            "--input",
            src,
            "--output",
            out,
            "--variant",
            "fp32",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ],
        check=True,
    )
    return np.load(out)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_float_and_base64_equal_the_cli(server, package, tmp_path):
    want = cli_embed(package, tmp_path, DOCS)
    c = client(server)
    floats = c.embeddings.create(model="tiny", input=DOCS, encoding_format="float")
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert [d.index for d in floats.data] == list(range(len(DOCS)))
    assert min_cosine(got, want) >= 0.99999
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(DOCS)
    # Explicit base64: the client hands back the string; little-endian float32.
    raw = c.embeddings.create(model="tiny", input=DOCS, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    np.testing.assert_array_equal(decoded, got)
    # No encoding_format: the client asks for base64 itself and decodes it.
    default = c.embeddings.create(model="tiny", input=DOCS[0])
    np.testing.assert_array_equal(np.array(default.data[0].embedding, dtype=np.float32), got[0])


def test_openai_client_few_shot_queries_equal_the_cli(server, package, examples, tmp_path):
    want = cli_embed(package, tmp_path, QUERIES, "--queries", "--task", INSTRUCTION, "--examples", str(examples))
    extra = {"instruction": INSTRUCTION, "examples": json.loads(examples.read_text(encoding="utf-8"))}
    r = client(server).embeddings.create(model="tiny", input=QUERIES, encoding_format="float", extra_body=extra)
    assert min_cosine(np.array([d.embedding for d in r.data]), want) >= 0.99999


def test_openai_client_sees_the_refusals(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").embeddings.create(model="tiny", input="x")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client(server).embeddings.create(model="tiny", input="x", dimensions=8)
    with pytest.raises(openai.BadRequestError):
        client(server).embeddings.create(model="tiny", input=[])
    with pytest.raises(openai.UnprocessableEntityError, match="unknown task"):
        client(server).embeddings.create(model="tiny", input="x", extra_body={"task": "nope"})


def test_openai_client_sees_the_prompt_bound_and_conflicting_tasks(server):
    """Issue 24: a few-shot prompt past --max-prompt-tokens (the tiny package has no attention
    window) is 413 naming the bound, and the server keeps serving; `task` and `prompt_name` that
    disagree are 422 naming both."""
    examples = [
        {"query": f"what is the capital of country number {i}", "response": f"City {i} is its capital."}
        for i in range(1000)
    ]
    with pytest.raises(openai.APIStatusError, match="max-prompt-tokens") as e:
        client(server).embeddings.create(
            model="tiny",
            input="x",
            encoding_format="float",
            extra_body={"instruction": INSTRUCTION, "examples": examples},
        )
    assert e.value.status_code == 413
    with pytest.raises(openai.UnprocessableEntityError, match="prompt_name"):
        client(server).embeddings.create(model="tiny", input="x", extra_body={"task": "a", "prompt_name": "b"})
    assert len(client(server).embeddings.create(model="tiny", input="x").data) == 1
