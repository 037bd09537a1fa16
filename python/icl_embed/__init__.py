"""icl-embed in Python: embeddings from BAAI/bge-en-icl (and models exported the same way) on ONNX Runtime.

The engine is the Rust library (the same as the `icl-embed` command line and server), loaded in process:
no PyTorch, and ONNX Runtime comes from the `onnxruntime` wheel this package depends on
(`onnxruntime-gpu` for CUDA). Embeddings are float32 numpy arrays `[n, hidden]`, L2-normalised, in
input order.

    >>> from icl_embed import Embedder, Example
    >>> embedder = Embedder("path/to/package")          # or a Hugging Face repo id "owner/name"
    >>> docs = embedder.embed_documents(["Paris is the capital of France.", "Rome is in Italy."])
    >>> prompt = embedder.query_prompt(
    ...     task="Given a web search query, retrieve relevant passages that answer the query",
    ...     examples=[Example("capital of Italy", "Rome is the capital of Italy.")],
    ... )
    >>> queries = embedder.embed_queries(prompt, ["capital of France?", "capital of Spain?"])
    >>> scores = queries @ docs.T

Batching is by tokens, not rows: pass all your texts at once and the engine sorts them by length and
groups them under a token budget (`batch_tokens`), as the command line does. Few-shot queries run on
the prefix cache: the examples' key/value states are computed once per prompt and kept between calls.

`Encoder` gives the final token ids without ONNX Runtime. `icl_embed.ray.Embed` embeds a column of a
Ray Data dataset across a cluster.

Errors: bad input raises `ValueError` naming the input (`texts[3]: expected str, got int`); a missing
or damaged package raises `PackageError`; an ONNX Runtime library or execution provider that cannot
start raises `RuntimeUnavailableError`; both derive from `IclEmbedError` (a `RuntimeError`). When no
variant fits in the memory the process may use (`variant="auto"`), `MemoryError` names each one's need.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from . import _icl_embed as _native
from ._icl_embed import (
    Example,
    IclEmbedError,
    Info,
    PackageError,
    QueryPrompt,
    RuntimeUnavailableError,
    __version__,
)

__all__ = [
    "Embedder",
    "Encoder",
    "Example",
    "IclEmbedError",
    "Info",
    "PackageError",
    "QueryPrompt",
    "RuntimeUnavailableError",
    "__version__",
    "onnxruntime_library",
]

ExampleLike = Example | Mapping[str, str]


def onnxruntime_library() -> str | None:
    """The ONNX Runtime shared library of the installed `onnxruntime` (or `onnxruntime-gpu`) wheel.

    Found without importing `onnxruntime`: its `capi/` folder ships `libonnxruntime.so.<version>`
    (`onnxruntime.dll` on Windows, `libonnxruntime.<version>.dylib` on macOS). None when no such
    wheel is installed; the engine then searches `ORT_DYLIB_PATH` and the usual places itself.
    """
    spec = find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        capi = Path(folder) / "capi"
        for pattern in ("libonnxruntime.so*", "libonnxruntime*.dylib", "onnxruntime.dll"):
            found = sorted(glob.glob(str(capi / pattern)))
            if found:
                return found[-1]
    return None


def _default_ort_lib(explicit: str | os.PathLike | None) -> str | None:
    if explicit is not None:
        return os.fspath(explicit)
    if os.environ.get("ORT_DYLIB_PATH"):
        return None  # the engine honours it
    return onnxruntime_library()


class Embedder:
    """Embeds documents and few-shot queries with one model package.

    Args:
        model: a package directory (made by `python -m export`) or a Hugging Face repo id
            (`owner/name[@revision]`), fetched into the hub cache (only the manifest, the tokenizer and
            the variant that runs; `HF_HUB_OFFLINE=1` never touches the network).
        variant: `"auto"` (on a GPU fp16; on the CPU int8 when the package records a faithful int8
            recipe with a fast kernel, else fp32, never one that does not fit in memory;
            `info.variant_reason` says why), or `"fp32"`, `"fp16"`, `"int8"`.
        device: `"auto"` (TensorRT or CUDA when the ONNX Runtime library has them and an NVIDIA driver
            is present, else the CPU), `"cpu"`, `"cuda[:N]"` or `"tensorrt[:N]"`.
        threads: ONNX Runtime's intra-op threads (default: one per core).
        batch_tokens: token budget of one batch, rows x padded length (default 512 on the CPU, 16384 on
            a GPU).
        max_batch: most rows in one batch.
        max_length: overrides the package's maximum lengths (512 for bge-en-icl, its reference's).
        prefix_cache: compute a few-shot prefix once and embed queries on top of its key/value states.
        cache_dir: TensorRT engines and stamps of verified files (default `~/.cache/icl-embed`).
        ort_lib: the ONNX Runtime library to load (default: the `onnxruntime` wheel's, see
            `onnxruntime_library()`).
        memory_limit: the memory `variant="auto"` may plan for on the CPU: `"auto"` (the cgroup's limit,
            else the memory available), a size (`"24G"`, `"512M"`, bytes as an int), or `"none"` (no
            check). `auto` takes the best variant that fits and says so in `info.variant_reason`.

    One embedder runs one call at a time (further calls from other threads wait); the GIL is released
    while it runs, so other Python threads, and other embedders, go on meanwhile.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        variant: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        batch_tokens: int | None = None,
        max_batch: int = 64,
        max_length: int | None = None,
        prefix_cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
        ort_lib: str | os.PathLike | None = None,
        memory_limit: str | int = "auto",
    ) -> None:
        self._native = _native.Embedder(
            os.fspath(model),
            variant,
            device,
            threads,
            batch_tokens,
            max_batch,
            max_length,
            prefix_cache,
            None if cache_dir is None else os.fspath(cache_dir),
            _default_ort_lib(ort_lib),
            str(memory_limit),
        )

    def embed_documents(self, texts: Iterable[str] | str, dimensions: int | None = None) -> np.ndarray:
        """Embeddings of documents: float32 `[n, hidden]`, L2-normalised, in input order.

        `texts` is any iterable of `str` (a list, a generator, a numpy array of strings); a single
        `str` is one document. Texts longer than `max_length` tokens are truncated as the reference
        does. `dimensions=N`: shortened vectors `[n, N]`, the first N components renormalised, for
        models trained for them (`info.dimensions` is the shortest allowed, None where the model
        allows none; a length outside `info.dimensions..=info.hidden_size` raises ValueError).
        """
        return self._native.embed_documents(_materialize(texts), dimensions)

    def query_prompt(self, task: str | None = None, examples: Iterable[ExampleLike] = ()) -> QueryPrompt:
        """The prompt for queries of one task: its instruction and few-shot examples, tokenized once.

        `task` defaults to the package's default task (`info.default_task`; without one a query is
        its raw text). `examples` (refused by packages whose `info.procedure` is `"instruct"`) are `Example`s or dicts with
        `query`, `response` and an optional `instruct` (the layout of the examples files in
        `tests/data/flagembedding-icl-examples`). Reuse the prompt for any number of
        `embed_queries` calls: its prefix's states stay in the prefix cache.
        """
        return self._native.query_prompt(task, list(examples))

    def embed_queries(
        self, prompt: QueryPrompt | None, texts: Iterable[str] | str, dimensions: int | None = None
    ) -> np.ndarray:
        """Embeddings of queries under `prompt` (from `query_prompt`; None: the default task, no
        examples): float32 `[n, hidden]`, L2-normalised, in input order; `dimensions` as in
        `embed_documents`."""
        if prompt is None:
            prompt = self.query_prompt()
        return self._native.embed_queries(prompt, _materialize(texts), dimensions)

    @property
    def info(self) -> Info:
        """What runs: `model`, `device`, `variant` and `variant_reason`, `hidden_size`,
        `max_length_documents`, `max_length_queries`, `window` (the attention window, or None),
        `prefix_cache`, `threads`, `onnxruntime` (the library loaded), `procedure` (the prompt
        procedure, `"flagembedding-icl"` or `"instruct"`), `default_task` (or None), `dimensions`
        (the shortest shortened vectors allowed, or None)."""
        return self._native.info

    @property
    def prefix_stats(self) -> dict[str, int]:
        """What the prefix cache did so far: `prefixes` computed, `hits`, `misses`, `prefix_tokens`
        and `state_bytes` of the last one, `bytes` held now, `cached_rows` embedded on a prefix and
        `full_rows` computed in full."""
        return self._native.prefix_stats

    def __repr__(self) -> str:
        i = self.info
        return f"Embedder({str(i.model)!r}, variant={i.variant!r}, device={i.device!r})"


class Encoder:
    """Final token ids of a package's documents and queries, exactly as the reference computes them;
    needs no ONNX Runtime.

        >>> enc = Encoder("path/to/package")
        >>> enc.documents(["a passage"])
        [[1, 264, 10495, 2]]
    """

    def __init__(self, model: str | os.PathLike) -> None:
        self._native = _native.Encoder(os.fspath(model))

    def documents(self, texts: Iterable[str] | str, max_length: int | None = None) -> list[list[int]]:
        """Token ids of documents (`max_length` defaults to the package's)."""
        return self._native.documents(_materialize(texts), max_length)

    def query_prompt(
        self, task: str | None = None, examples: Iterable[ExampleLike] = (), max_length: int | None = None
    ) -> QueryPrompt:
        """The prompt for queries of one task (see `Embedder.query_prompt`)."""
        return self._native.query_prompt(task, list(examples), max_length)

    def queries(self, prompt: QueryPrompt | None, texts: Iterable[str] | str) -> list[list[int]]:
        """Token ids of queries under `prompt` (None: the default task, no examples)."""
        if prompt is None:
            prompt = self.query_prompt()
        return self._native.queries(prompt, _materialize(texts))

    @property
    def model(self) -> Path:
        """The package directory."""
        return Path(self._native.model)


def _materialize(texts: Iterable[str] | str) -> list[str] | str:
    """A list the engine takes (numpy string arrays become Python strings; a lone `str` stays one text)."""
    if isinstance(texts, str):
        return texts
    if isinstance(texts, np.ndarray):
        return texts.tolist()
    return texts if isinstance(texts, list) else list(texts)
