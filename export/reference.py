"""The parity oracle: FlagEmbedding's own ICLLLMEmbedder, run on CPU in fp32.

This module does not rebuild the reference procedure (export/REFERENCE.md section 2); it calls it
(`FlagICLModel.encode_queries` / `encode_corpus`) and only watches what happens:

- the token ids: the tokenizer is given a recording subclass; every call made with special tokens
  is a final encoding (the calls with `add_special_tokens=False` are the prefix/suffix probes and the
  step-4 pre-tokenization), one per batch, in input order;
- the model input: a forward pre-hook sees every padded batch; the unpadded rows of the batches that
  produced the embeddings must be exactly the recorded ids (as a multiset, since FlagEmbedding sorts
  by length). Anything else is an error, never a warning.

Refused, here and in the Rust CLI alike: examples without `instruct` when no task is given (FlagEmbedding
would render the literal text "None"), an empty example list (it would render a bare "\\n\\n" prefix),
a task or examples for documents, and an empty input.

    python -m export.reference --model DIR --input FILE --output OUT.npy [--ids OUT.jsonl]
        [--queries [--task TEXT] [--examples FILE]] [--field text] [--max-length 512] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from export.io import read_examples, read_texts  # noqa: E402

LOG = logging.getLogger("export.reference")

DEFAULT_MAX_LENGTH = 512
DEFAULT_BATCH_SIZE = 32


class ReferenceError(ValueError):
    """The reference cannot run these inputs, or what it fed the model is not what it tokenized."""


def check_request(
    texts: Sequence[str], queries: bool, task: str | None, examples: Sequence[dict[str, str]] | None
) -> None:
    """Refuse what FlagEmbedding would silently turn into something else."""
    if not texts:
        raise ReferenceError("no input texts")
    if not queries:
        if task is not None or examples is not None:
            raise ReferenceError("a task or examples apply to queries only")
        return
    if examples is None:
        return
    if len(examples) == 0:
        raise ReferenceError('the example list is empty (FlagEmbedding would use a bare "\\n\\n" prefix)')
    if task is None:
        missing = [i for i, e in enumerate(examples) if "instruct" not in e]
        if missing:
            raise ReferenceError(
                f"examples {missing} have no 'instruct' and no task is given "
                '(FlagEmbedding would write the literal text "None")'
            )


def reference_embed(
    model_dir: str | Path,
    texts: Sequence[str],
    queries: bool,
    task: str | None = None,
    examples: Sequence[dict[str, str]] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, list[list[int]]]:
    """Embeddings (float32 [N, hidden], input order) and final token ids per input, by FlagEmbedding."""
    check_request(texts, queries, task, examples)
    embedder = load_embedder(model_dir, task, examples, max_length, batch_size)
    recorder = record_tokenizer(embedder.tokenizer)
    batches: list[tuple[Any, Any]] = []
    hook = embedder.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: batches.append((kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True
    )
    try:
        if queries:
            embeddings = embedder.encode_queries(list(texts))
        else:
            embeddings = embedder.encode_corpus(list(texts))
    finally:
        hook.remove()
    ids = [list(row) for call in recorder.calls for row in call]
    check_ids(ids, batches, len(texts))
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.shape[0] != len(texts):
        raise ReferenceError(f"{embeddings.shape[0]} embeddings for {len(texts)} texts")
    return embeddings, ids


def load_embedder(
    model_dir: str | Path, task: str | None, examples: Sequence[dict[str, str]] | None, max_length: int, batch_size: int
) -> Any:
    # FlagEmbedding is heavy to import (it brings in its whole training stack) and only the oracle's
    # runs need it: `export.io` and the tests that import this module do not.
    from FlagEmbedding import FlagICLModel  # noqa: PLC0415

    torch.manual_seed(0)
    return FlagICLModel(
        str(model_dir),
        query_instruction_for_retrieval=task,
        examples_for_task=list(examples) if examples is not None else None,
        use_fp16=False,
        devices="cpu",
        batch_size=batch_size,
        query_max_length=max_length,
        passage_max_length=max_length,
    )


def record_tokenizer(tokenizer: Any) -> Any:
    """Make `tokenizer` remember the `input_ids` of every call made with special tokens.

    Python looks `__call__` up on the type, so the instance gets a one-off subclass; everything else
    (batch_decode, pad, settings) is the tokenizer's own. Returns the tokenizer; its `calls` attribute
    is the list of recorded batches.
    """
    base = type(tokenizer)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = base.__call__(self, *args, **kwargs)
        if kwargs.get("add_special_tokens", True):
            ids = out["input_ids"]
            self.calls.append([ids] if ids and isinstance(ids[0], int) else [list(r) for r in ids])
        return out

    tokenizer.__class__ = type(f"Recording{base.__name__}", (base,), {"__call__": __call__})
    tokenizer.calls = []
    return tokenizer


def check_ids(ids: list[list[int]], batches: list[tuple[Any, Any]], count: int) -> None:
    """The recorded ids are one row per input and exactly the rows the model's forward received.

    FlagEmbedding runs its first (longest) batch once more before the real loop to probe the batch
    size, so only the trailing forward calls that together hold `count` rows are compared.
    """
    if len(ids) != count:
        raise ReferenceError(f"recorded {len(ids)} final encodings for {count} inputs")
    fed: list[tuple[int, ...]] = []
    for input_ids, mask in reversed(batches):
        if len(fed) >= count:
            break
        rows = [tuple(int(t) for t, m in zip(r.tolist(), k.tolist()) if m) for r, k in zip(input_ids, mask)]
        fed = rows + fed
    if collections.Counter(fed) != collections.Counter(tuple(r) for r in ids):
        raise ReferenceError("the ids the model received differ from the ids the tokenizer returned")


def write_ids(path: Path, ids: list[list[int]]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for index, row in enumerate(ids):
            out.write(json.dumps({"index": index, "ids": row}) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.reference",
        description="Embed texts with FlagEmbedding's ICLLLMEmbedder (the parity oracle).",
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--input", type=Path, required=True, help="text lines, or JSON lines (.jsonl/.ndjson)")
    parser.add_argument("--output", type=Path, required=True, help=".npy file: float32 [N, hidden], input order")
    parser.add_argument("--field", default="text", help="JSON-lines field holding the text (default text)")
    parser.add_argument("--queries", action="store_true", help="embed as queries (default: documents)")
    parser.add_argument("--task", default=None, help="task instruction for queries")
    parser.add_argument("--examples", type=Path, default=None, help="few-shot examples (JSON list or JSON lines)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--ids", type=Path, default=None, help="also write the final token ids as JSON lines")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.queries and (args.task is not None or args.examples is not None):
        parser.error("--task and --examples need --queries")
    if args.max_length < 1 or args.batch_size < 1:
        parser.error("--max-length and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s"
    )
    try:
        texts = read_texts(args.input, args.field)
        examples = read_examples(args.examples) if args.examples is not None else None
        embeddings, ids = reference_embed(
            args.model, texts, args.queries, args.task, examples, args.max_length, args.batch_size
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(args.output, "wb") as out:  # np.save(path) would append ".npy" to other names
        np.save(out, embeddings)
    if args.ids is not None:
        write_ids(args.ids, ids)
    LOG.info("embedded %d texts into %s", len(texts), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
