"""The parity sets: inputs, tasks and few-shot examples that `icl-embed` must tokenize and embed
exactly as each model's reference pipeline does (issues 3 and 27).

`cases()` is bge-en-icl's set (FlagEmbedding's few-shot procedure); `instruct_cases()` the set of
the `instruct` families (Qwen3-Embedding, e5-mistral): documents, and queries with a task, with the
default task (`task` null) and truncated, never examples. `write_cases(out)` lays a set's inputs
out under `out/` and writes `out/cases.json`, which the Rust integration tests read. Real text comes
from tests/data/flagembedding-icl-examples (the few-shot example sets FlagEmbedding publishes); the
hand-written edge cases live in `edge.jsonl` beside this file.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "tests" / "data" / "flagembedding-icl-examples"

SCIFACT_TASK = "Given a scientific claim, retrieve documents that support or refute the claim"
ARGUANA_TASK = "Given a claim, find documents that refute the claim"


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def edge_texts() -> list[str]:
    return [row["text"] for row in load_jsonl(HERE / "edge.jsonl")]


def qa_rows(limit_per_file: int = 3) -> list[dict]:
    rows = []
    for path in sorted((DATA / "AIR-Bench" / "qa").glob("*.jsonl")):
        rows.extend(load_jsonl(path)[:limit_per_file])
    return rows


def long_texts() -> list[str]:
    """Passages far over 512 tokens, so that truncation applies."""
    texts = []
    for path in sorted((DATA / "AIR-Bench" / "long-doc").glob("*.jsonl"))[:3]:
        row = load_jsonl(path)[0]
        texts.append((row["pos"] + " ") * 4)
    return texts


def examples(task_file: str, with_instruct: str | None = None) -> list[dict]:
    items = json.loads((DATA / "MTEB" / task_file).read_text(encoding="utf-8"))
    if with_instruct is not None:
        items = [{"instruct": with_instruct, **e} for e in items]
    return items


def cases() -> list[dict]:
    """Each case: name, texts, queries flag, task, examples, max_length."""
    qa = qa_rows()
    queries = [r["query"] for r in qa]
    passages = [r["pos"] for r in qa]
    edge = edge_texts()
    long = long_texts()
    return [
        {"name": "docs_edge", "texts": edge, "queries": False},
        {"name": "docs_passages", "texts": passages + long, "queries": False},
        {
            "name": "q_task_examples",
            "texts": queries + edge + long[:1],
            "queries": True,
            "task": SCIFACT_TASK,
            "examples": examples("SciFact.json"),
        },
        {"name": "q_task", "texts": queries + edge, "queries": True, "task": ARGUANA_TASK},
        {"name": "q_plain", "texts": queries + edge, "queries": True},
        {
            "name": "q_examples_own_instruct",
            "texts": queries[:8],
            "queries": True,
            "examples": examples("ArguAna.json", with_instruct=ARGUANA_TASK),
        },
        {
            "name": "q_truncated",
            "texts": queries[:6] + long + edge[4:12],
            "queries": True,
            "task": SCIFACT_TASK,
            "examples": examples("SciFact.json"),
            "max_length": 40,
        },
        {"name": "docs_truncated", "texts": passages[:6] + edge[4:12], "queries": False, "max_length": 24},
    ]


# Other vocabularies' special tokens as text: for Qwen's tokenizer they are single tokens (the
# runtime must split them out as the reference does), for Mistral's plain text.
INSTRUCT_EDGE = [
    "text with <|endoftext|> inside and <|im_start|>user after it",
    "ends with the end token<|endoftext|>",
    "<|im_end|><think>\n</think> tool tokens <tool_call>",
    "Query:no space after the colon",
]


def instruct_cases() -> list[dict]:
    """The `instruct` procedure's cases: `task` None means the package's default task; `max_length`
    None the package's (8192 for Qwen3-Embedding, 4096 for e5-mistral)."""
    qa = qa_rows()
    queries = [r["query"] for r in qa]
    passages = [r["pos"] for r in qa]
    edge = edge_texts() + INSTRUCT_EDGE
    long = long_texts()
    return [
        {"name": "docs_edge", "texts": edge, "queries": False},
        {"name": "docs_passages", "texts": passages + long, "queries": False},
        {"name": "docs_truncated", "texts": passages[:6] + long + edge[4:12], "queries": False, "max_length": 48},
        {"name": "q_task", "texts": queries + edge, "queries": True, "task": SCIFACT_TASK},
        {"name": "q_default_task", "texts": queries + edge, "queries": True},
        {
            "name": "q_truncated",
            "texts": queries[:6] + long + edge[4:12],
            "queries": True,
            "task": ARGUANA_TASK,
            "max_length": 40,
        },
        {"name": "q_truncated_default_task", "texts": queries[:4] + long, "queries": True, "max_length": 32},
    ]


SETS = {"flagembedding-icl": cases, "instruct": instruct_cases}


def spread(items: list, n: int) -> list:
    """n of items spread evenly, the first and the last included (all of them when n >= len)."""
    if n >= len(items):
        return list(items)
    if n <= 1:
        return list(items[:n])
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def write_cases(
    out: Path,
    only: set[str] | None = None,
    max_texts: dict[str, int] | None = None,
    procedure: str = "flagembedding-icl",
) -> list[dict]:
    """Writes each case's input (JSON lines) and examples file under `out`, and `out/cases.json`;
    `procedure` picks the set (`SETS`), `only` restricts it to the named cases, `max_texts` cuts a
    case to that many of its texts (spread over it)."""
    out.mkdir(parents=True, exist_ok=True)
    listed = []
    for case in SETS[procedure]():
        if only is not None and case["name"] not in only:
            continue
        name = case["name"]
        if max_texts and name in max_texts:
            case["texts"] = spread(case["texts"], max_texts[name])
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for text in case["texts"]:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        entry = {
            "name": name,
            "input": f"{name}.jsonl",
            "queries": case["queries"],
            "task": case.get("task"),
            "examples": None,
            "max_length": case.get("max_length"),
            "count": len(case["texts"]),
        }
        if case.get("examples") is not None:
            entry["examples"] = f"{name}.examples.json"
            (out / entry["examples"]).write_text(json.dumps(case["examples"], ensure_ascii=False), encoding="utf-8")
        listed.append(entry)
    (out / "cases.json").write_text(json.dumps(listed, indent=1), encoding="utf-8")
    return listed
