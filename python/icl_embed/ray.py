"""Corpus embedding across a cluster with Ray Data: `Embed`, a callable class for `Dataset.map_batches`.

    import ray
    from icl_embed.ray import Embed

    ds = ray.data.read_parquet("passages.parquet")          # a column "text" (and any others)
    ds = ds.map_batches(
        Embed,
        fn_constructor_kwargs={"model": "/models/bge-en-icl", "variant": "int8"},
        compute=ray.data.ActorPoolStrategy(size=4),  # actors: each loads the package once
        num_cpus=8,         # per actor; its ONNX Runtime threads follow it
        batch_size=256,
    )
    ds.write_parquet("embeddings/")                          # every column, plus "embedding"

Each actor keeps its `Embedder` (and so the few-shot prefix cache) for all the batches it gets. Ray
Data does not keep row order unless told: `ray.data.DataContext.get_current().execution_options.preserve_order = True`,
or carry an id column through (every input column is passed on).

This module imports Ray only for the actor's CPU count; `Embed` itself works on any batch of the
layouts Ray hands over (`dict` of numpy arrays, pandas `DataFrame`, pyarrow `Table`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import Embedder, Example

__all__ = ["Embed"]


def _actor_cpus() -> int | None:
    """The CPUs Ray assigned to this actor or task, or None outside Ray."""
    try:
        import ray  # noqa: PLC0415  (optional: only inside a Ray worker)
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None


class Embed:
    """Embeds a text column of each batch into an embedding column (float32 vectors, L2-normalised).

    Args:
        model: a package directory or Hugging Face repo id, on every node (or in each node's hub cache).
        text_column: the column of texts (default `"text"`).
        embedding_column: the column written (default `"embedding"`): one float32 vector per row.
        queries: embed the texts as queries under `task` and `examples` (default: documents).
        task: the queries' instruction (default: the package's).
        examples: few-shot examples: `Example`s or dicts with `query`, `response`, optional `instruct`.
        threads: ONNX Runtime threads; default the CPUs Ray gave the actor (`num_cpus`), else one per core.
        **embedder_options: the other keyword arguments of `icl_embed.Embedder` (`variant`, `device`,
            `batch_tokens`, `max_length`, ...).

    Every other column of the batch is passed through unchanged, so ids stay with their rows.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        text_column: str = "text",
        embedding_column: str = "embedding",
        queries: bool = False,
        task: str | None = None,
        examples: Iterable[Example | Mapping[str, str]] = (),
        threads: int | None = None,
        **embedder_options: Any,
    ) -> None:
        examples = list(examples)
        if not queries and (task is not None or examples):
            raise ValueError("task and examples apply to queries: pass queries=True")
        if threads is None:
            threads = _actor_cpus()
        self.embedder = Embedder(model, threads=threads, **embedder_options)
        self.text_column = text_column
        self.embedding_column = embedding_column
        self.prompt = self.embedder.query_prompt(task, examples) if queries else None

    def embed(self, texts: Iterable[str]) -> np.ndarray:
        """Embeddings of `texts` as documents or queries, as this instance was set up."""
        if self.prompt is None:
            return self.embedder.embed_documents(texts)
        return self.embedder.embed_queries(self.prompt, texts)

    def __call__(self, batch: Any) -> Any:
        texts = _column(batch, self.text_column)
        vectors = self.embed(texts)
        if isinstance(batch, Mapping):
            out = dict(batch)
            out[self.embedding_column] = vectors
            return out
        if hasattr(batch, "append_column"):  # pyarrow.Table
            import pyarrow as pa  # noqa: PLC0415  (only for pyarrow batches)

            vectors_column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
            return batch.append_column(self.embedding_column, vectors_column)
        batch = batch.copy()  # pandas.DataFrame
        batch[self.embedding_column] = list(vectors)
        return batch


def _column(batch: Any, name: str) -> list[str]:
    try:
        column = batch[name]
    except (KeyError, TypeError):
        columns = list(batch.keys()) if isinstance(batch, Mapping) else list(getattr(batch, "column_names", batch))
        raise ValueError(f"text column {name!r} is not in the batch (columns: {columns})") from None
    if hasattr(column, "to_pylist"):  # pyarrow
        return column.to_pylist()
    return column.tolist() if hasattr(column, "tolist") else list(column)
