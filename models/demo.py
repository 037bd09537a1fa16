"""Inputs and report for models/demo.sh.

`prepare` writes the demo corpus from tests/data: the AIR-Bench QA passages (plus long
documents as distractors) and their questions, a retrieval task instruction and three MS MARCO
few-shot examples. `report` prints, for each question, the passage icl-embed ranks first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "flagembedding-icl-examples"
TASK = "Given a web search query, retrieve relevant passages that answer the query"


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare(out: Path) -> None:
    qa = [row for path in sorted((DATA / "AIR-Bench" / "qa").glob("*.jsonl")) for row in load_jsonl(path)]
    distractors = [load_jsonl(p)[0]["pos"][:4000] for p in sorted((DATA / "AIR-Bench" / "long-doc").glob("*.jsonl"))]
    with open(out / "passages.jsonl", "w", encoding="utf-8") as f:
        for text in [r["pos"] for r in qa] + distractors:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for r in qa:
            f.write(json.dumps({"text": r["query"]}, ensure_ascii=False) + "\n")
    (out / "examples.json").write_text((DATA / "MTEB" / "MSMARCO.json").read_text(encoding="utf-8"), encoding="utf-8")
    (out / "task.txt").write_text(TASK, encoding="utf-8")


def report(out: Path) -> None:
    passages = np.load(out / "passages.npy")
    queries = np.load(out / "queries.npy")
    questions = [r["text"] for r in load_jsonl(out / "queries.jsonl")]
    texts = [r["text"] for r in load_jsonl(out / "passages.jsonl")]
    scores = queries @ passages.T
    hits = 0
    print(f"\nqueries: {out / 'queries.npy'} {queries.shape}; passages: {out / 'passages.npy'} {passages.shape}")
    print(f"{'#':>2}  {'gold':>5}  {'top-1':>5}  {'rank':>4}  question -> top passage")
    for i, q in enumerate(questions):
        order = np.argsort(-scores[i])
        rank = int(np.where(order == i)[0][0]) + 1
        hits += rank == 1
        top = texts[order[0]].replace("\n", " ")
        print(f"{i:>2}  {scores[i, i]:5.3f}  {scores[i, order[0]]:5.3f}  {rank:>4}  {q[:50]!r} -> {top[:50]!r}")
    print(f"\nthe question's own passage ranks first for {hits} of {len(questions)} questions "
          f"(smollm2 is a stand-in, not a trained embedder: this shows the pipeline, not bge-en-icl's quality)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "report"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    prepare(args.out) if args.step == "prepare" else report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
