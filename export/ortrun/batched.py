"""Last-token embeddings of many rows: each row alone (no padding) or rows of similar length
right-padded into batches, optionally on top of start states (ids every row begins with, and their
key/value states); through one whole-graph session (`embed_rows`) or a `SegmentedGraph`
(`embed_segmented`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .batch import Batch, last_token, right_padded, without_start
from .segmented import Run, SegmentedGraph
from .session import onnx_hidden, session

Start = tuple[list[int], dict[str, np.ndarray]]  # the start ids and their `past.*` states


def embed_rows(
    graph: Path, rows: list[list[int]], threads: int = 2, start: Start | None = None, batch_tokens: int = 0
) -> tuple[np.ndarray, float]:
    """Last-token embeddings of `rows` and the seconds it took: each row run alone (no padding), or
    with `batch_tokens`, rows of similar length right-padded into batches of at most that many
    tokens (rows x longest; a longer row runs alone). With `start` (ids every row begins with, and
    their states) the rows run on top of those states."""
    sess = session(graph, threads)
    result = embed(sess, rows, start, batch_tokens)
    del sess
    return result


def batches(rows: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Indexes of `rows`, shortest first, cut into batches of at most `batch_tokens` padded tokens."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * len(rows[i]) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def embed(sess, rows: list[list[int]], start: Start | None = None, batch_tokens: int = 0) -> tuple[np.ndarray, float]:
    """`embed_rows` on an open session."""
    out: list[np.ndarray | None] = [None] * len(rows)
    began = time.perf_counter()
    for index, embeddings in embedded(sess, rows, start, batch_tokens):
        for i, e in zip(index, embeddings):
            out[i] = e
    return np.stack(out), time.perf_counter() - began


def embedded(
    sess, rows: list[list[int]], start: Start | None, batch_tokens: int
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yields the indexes of each batch of `batched` and their last-token embeddings."""
    for index, batch, past in batched(rows, start, batch_tokens):
        yield index, last_token(onnx_hidden(sess, batch, past), batch.attention_mask)


def batched(
    rows: list[list[int]], start: Start | None, batch_tokens: int
) -> Iterator[tuple[list[int], Batch, dict | None]]:
    """The batches of `batches` as graph inputs, shortest rows first: (indexes, batch, past states).

    Right padding leaves each row's last real token as it is alone (attention is causal); only
    the summation order of the matrix products differs. Rows on the start states and rows without
    them (not beginning with its ids, or nothing after them) are batched apart."""
    k = len(start[0]) if start else 0
    on_start = [bool(k) and row[:k] == start[0] and len(row) > k for row in rows]
    for group in (True, False):
        members = [i for i in range(len(rows)) if on_start[i] == group]
        for part in batches([rows[i] for i in members], batch_tokens):
            index = [members[j] for j in part]
            batch = right_padded([rows[i] for i in index], pad_id=0)
            if group:
                yield index, without_start(batch, k), start[1]
            else:
                yield index, batch, None


def embed_segmented(
    segmented: SegmentedGraph, rows: list[list[int]], start: Start | None, batch_tokens: int
) -> tuple[np.ndarray, float]:
    """`embed`, with the graph run one layer at a time (a `SegmentedGraph`), every batch in
    lockstep: one layer's weights in memory instead of all of them (a whole int8 graph of
    bge-en-icl is 7-8 GB of mapped weights)."""
    empty = segmented.empty_past()
    parts = list(batched(rows, start, batch_tokens))
    runs = [Run({**batch.feeds(), **(past if past is not None else empty)}, set()) for _, batch, past in parts]
    out: list[np.ndarray | None] = [None] * len(rows)

    def pool(run: int, name: str, value: np.ndarray) -> None:
        if name == "last_hidden_state":
            index, batch, _ = parts[run]
            for i, e in zip(index, last_token(value, batch.attention_mask)):
                out[i] = e

    began = time.perf_counter()
    segmented.run(runs, pool)
    return np.stack(out), time.perf_counter() - began
