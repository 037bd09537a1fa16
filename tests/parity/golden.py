"""Writes the reference outputs of the parity set for one model: for each case of `cases.py`,
`<out>/<case>.npy` (the reference's embeddings) and `<out>/<case>.ids.jsonl` (the token ids it fed
the model), computed by the family's own pipeline, fp32, CPU: `export.reference` (FlagEmbedding
itself) for bge-en-icl, `export.cards` (sentence-transformers for Qwen3-Embedding, the model card's
transformers code for e5-mistral) for the `instruct` families, on `cases.instruct_cases()`.

    PYTHONPATH=. .venv/bin/python tests/parity/golden.py --model MODEL_DIR --out DIR [--family F]
        [--only CASES] [--max-texts CASE=N ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from cases import write_cases  # this script's folder, which Python puts first on sys.path

from export import family as families  # the repository root on PYTHONPATH (tests/fixtures.sh)
from export.cards import instruct_embed
from export.reference import reference_embed, write_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--family", default="bge-en-icl", choices=families.names(), help="the model's family (default bge-en-icl)"
    )
    parser.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    parser.add_argument(
        "--max-texts",
        action="append",
        default=[],
        metavar="CASE=N",
        help="cut CASE to N of its texts, spread over it (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    only = set(args.only.split(",")) if args.only else None
    try:
        max_texts = {k: int(v) for k, v in (item.split("=", 1) for item in args.max_texts)}
    except ValueError:
        parser.error(f"--max-texts takes CASE=N, got {args.max_texts}")
    family = families.load(args.family)
    for case in write_cases(args.out, only, max_texts, family.procedure):
        texts = [
            json.loads(line)["text"] for line in (args.out / case["input"]).read_text(encoding="utf-8").splitlines()
        ]
        examples = json.loads((args.out / case["examples"]).read_text(encoding="utf-8")) if case["examples"] else None
        if family.procedure == "instruct":
            embeddings, ids = instruct_embed(
                args.model, family, texts, case["queries"], case["task"], case["max_length"]
            )
        else:
            embeddings, ids = reference_embed(
                args.model,
                texts,
                case["queries"],
                task=case["task"],
                examples=examples,
                max_length=case["max_length"] or 512,
            )
        np.save(args.out / f"{case['name']}.npy", embeddings)
        write_ids(args.out / f"{case['name']}.ids.jsonl", ids)
        print(f"{case['name']}: {len(texts)} texts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
