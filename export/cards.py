"""The parity oracles of the `instruct` families: each model's own published pipeline, run on CPU in fp32.

- Qwen3-Embedding: sentence-transformers, as its model card uses it (`SentenceTransformer(dir)`;
  queries `model.encode(queries, prompt="Instruct: {task}\\nQuery:")`, the default task being its
  `prompts["query"]`; documents a plain `encode`), with the tokenizer's left padding;
  `card_embed` runs the card's transformers code (left padding, `last_token_pool`, normalise) and
  the tests cross-check the two.
- e5-mistral-7b-instruct: the model card's transformers code (`card_embed`): tokenize with `<s>`
  to `max_length - 1` ids, append `</s>`, pad, pool the last token, normalise.

Like `export.reference` (FlagEmbedding's oracle) these return the embeddings and the token ids each
input was embedded from, taken from what the model's forward received (the unpadded rows), so that
the runtime's tokenizer can be checked id for id. Few-shot examples do not exist here.

    python -m export.cards --model DIR --family FAMILY --input FILE --output OUT.npy [--ids OUT.jsonl]
        [--queries [--task TEXT]] [--max-length N] [--pipeline sentence-transformers|card]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from export import family as families  # noqa: E402
from export.io import read_texts  # noqa: E402
from export.reference import ReferenceError, write_ids  # noqa: E402

LOG = logging.getLogger("export.cards")
DEFAULT_BATCH_SIZE = 8
PIPELINES = ("sentence-transformers", "card")


def instruct_texts(family: families.Family, texts: Sequence[str], queries: bool, task: str | None) -> list[str]:
    """The texts as the model card feeds them: queries through the family's template."""
    if not texts:
        raise ReferenceError("no input texts")
    if not queries:
        if task is not None:
            raise ReferenceError("a task applies to queries only")
        return list(texts)
    return [family.query_text(t, task) for t in texts]


def unpadded(input_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [[int(t) for t, m in zip(r.tolist(), k.tolist()) if m] for r, k in zip(input_ids, mask)]


# --- the model cards' transformers code ------------------------------------------------------------


def last_token_pool(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model cards' pooling (Qwen3-Embedding's and e5-mistral's are the same function)."""
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def card_embed(
    model_dir: str | Path,
    family: families.Family,
    texts: Sequence[str],
    queries: bool,
    task: str | None = None,
    max_length: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, list[list[int]]]:
    """Embeddings and ids by the model card's transformers code. Qwen3-Embedding's card tokenizes
    with `padding=True, truncation=True, max_length` on a left-padding tokenizer (which appends
    `<|endoftext|>` itself); e5-mistral's tokenizes to `max_length - 1` without padding, appends
    `</s>` and pads with `tokenizer.pad` (where a tokenizer appends `</s>` itself, as newer copies of
    e5's do, plain truncation to `max_length` gives the same ids)."""
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    inputs = instruct_texts(family, texts, queries, task)
    max_length = max_length or family.max_length["query" if queries else "document"]
    padding_side = "left" if family.name == "qwen3-embedding" else None
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), **({"padding_side": padding_side} if padding_side else {})
    )
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    self_appends = tokenizer("a")["input_ids"][-1:] == [eos]
    out, ids = [], []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        if family.append_eos and not self_appends:
            batch = tokenizer(
                chunk, max_length=max_length - 1, return_attention_mask=False, padding=False, truncation=True
            )
            batch["input_ids"] = [row + [eos] for row in batch["input_ids"]]
            batch = tokenizer.pad(batch, padding=True, return_attention_mask=True, return_tensors="pt")
        else:
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        pooled = torch.nn.functional.normalize(last_token_pool(hidden, batch["attention_mask"]), p=2, dim=1)
        out.append(pooled.float().numpy())
        ids += unpadded(batch["input_ids"], batch["attention_mask"])
    return np.concatenate(out).astype(np.float32), ids


# --- sentence-transformers -------------------------------------------------------------------------


def sentence_transformers_embed(
    model_dir: str | Path,
    family: families.Family,
    texts: Sequence[str],
    queries: bool,
    task: str | None = None,
    max_length: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, list[list[int]]]:
    """Embeddings and ids by sentence-transformers as the Qwen3-Embedding card calls it: queries
    `encode(texts, prompt=...)` (with the default task, `prompt_name="query"`, the same text),
    documents a plain `encode`. The ids are read at the last module (Normalize), whose features hold
    each batch's `input_ids`, `attention_mask` and `sentence_embedding` together; sentence-transformers
    sorts inputs by length, so each returned embedding is matched to its row by equality."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    instruct_texts(family, texts, queries, task)  # the same refusals as the card's code
    template = family.prompt["query"]
    if not template.endswith("{query}"):
        raise ReferenceError(f"family {family.name}: the query template does not end in {{query}}")
    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"dtype": torch.float32})
    if max_length is not None:
        model.max_seq_length = max_length
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hook = model[len(model) - 1].register_forward_hook(
        lambda _m, _args, out: seen.append((out["input_ids"], out["attention_mask"], out["sentence_embedding"]))
    )
    if not queries:
        prompt = {}
    elif task is None:
        prompt = {"prompt_name": "query"}
    else:
        prompt = {"prompt": template.format(task=task, query="")}
    try:
        embeddings = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, **prompt)
    finally:
        hook.remove()
    rows: dict[bytes, list[int]] = {}
    for input_ids, mask, pooled in seen:
        for row, vector in zip(unpadded(input_ids, mask), pooled.float().numpy()):
            rows[vector.astype(np.float32).tobytes()] = row
    embeddings = np.asarray(embeddings, dtype=np.float32)
    try:
        ids = [rows[v.tobytes()] for v in embeddings]
    except KeyError as e:
        raise ReferenceError("an embedding sentence-transformers returned was not among those its model made") from e
    return embeddings, ids


def instruct_embed(
    model_dir: str | Path,
    family: families.Family,
    texts: Sequence[str],
    queries: bool,
    task: str | None = None,
    max_length: int | None = None,
    pipeline: str | None = None,
) -> tuple[np.ndarray, list[list[int]]]:
    """The family's own reference pipeline (`family.reference`), or `pipeline` when given."""
    pipeline = pipeline or ("sentence-transformers" if family.reference == "sentence-transformers" else "card")
    run = sentence_transformers_embed if pipeline == "sentence-transformers" else card_embed
    embeddings, ids = run(model_dir, family, texts, queries, task, max_length)
    if embeddings.shape[0] != len(texts) or len(ids) != len(texts):
        raise ReferenceError(f"{embeddings.shape[0]} embeddings and {len(ids)} id rows for {len(texts)} texts")
    return embeddings, ids


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.cards", description="Embed texts with an instruct model's own pipeline."
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--family", required=True, choices=[n for n in families.names() if n != "bge-en-icl"])
    parser.add_argument("--input", type=Path, required=True, help="text lines, or JSON lines (.jsonl/.ndjson)")
    parser.add_argument("--output", type=Path, required=True, help=".npy file: float32 [N, hidden], input order")
    parser.add_argument("--field", default="text")
    parser.add_argument("--queries", action="store_true", help="embed as queries (default: documents)")
    parser.add_argument("--task", default=None, help="task for queries (default: the family's default task)")
    parser.add_argument("--max-length", type=int, default=None, help="default: the family's")
    parser.add_argument("--pipeline", choices=PIPELINES, default=None, help="default: the family's reference")
    parser.add_argument("--ids", type=Path, default=None, help="also write the final token ids as JSON lines")
    args = parser.parse_args(argv)
    if args.task is not None and not args.queries:
        parser.error("--task needs --queries")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        texts = read_texts(args.input, args.field)
        embeddings, ids = instruct_embed(
            args.model, families.load(args.family), texts, args.queries, args.task, args.max_length, args.pipeline
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(args.output, "wb") as out:
        np.save(out, embeddings)
    if args.ids is not None:
        write_ids(args.ids, ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
