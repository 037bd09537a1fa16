"""Type stubs of the compiled module `icl_embed._icl_embed` (python/src/lib.rs). Use the classes through
`icl_embed`, whose `Embedder` and `Encoder` wrap the native ones with defaults and documentation."""

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

__version__: str

class IclEmbedError(RuntimeError):
    """Base class of icl-embed's own errors (bad input is a ValueError instead)."""

class PackageError(IclEmbedError):
    """The model package is missing, incomplete, damaged or inconsistent."""

class RuntimeUnavailableError(IclEmbedError):
    """ONNX Runtime, or the execution provider asked for, cannot be loaded or started."""

class Example:
    """One few-shot example: a query, the response the model should imitate, and optionally its own
    instruction (the task's when None)."""

    query: str
    response: str
    instruct: str | None
    def __init__(self, query: str, response: str, instruct: str | None = None) -> None: ...

class QueryPrompt:
    """A task and its few-shot examples, tokenized once; belongs to the package that made it."""

    task: str | None
    examples: int
    @property
    def prefix_ids(self) -> list[int] | None: ...

class Info:
    """What an embedder runs."""

    model: Path
    device: str
    variant: str
    variant_reason: str
    hidden_size: int
    max_length_documents: int
    max_length_queries: int
    window: int | None
    prefix_cache: bool
    threads: int | None
    onnxruntime: Path | None
    dimensions: int | None
    procedure: str
    default_task: str | None

_Examples = Iterable[Example | Mapping[str, str | None]] | None

class Encoder:
    def __init__(self, model: str | os.PathLike) -> None: ...
    def documents(self, texts: Iterable[str] | str, max_length: int | None = None) -> list[list[int]]: ...
    def query_prompt(
        self, task: str | None = None, examples: _Examples = None, max_length: int | None = None
    ) -> QueryPrompt: ...
    def queries(self, prompt: QueryPrompt, texts: Iterable[str] | str) -> list[list[int]]: ...
    @property
    def model(self) -> Path: ...

class Embedder:
    def __init__(
        self,
        model: str | os.PathLike,
        variant: str,
        device: str,
        threads: int | None,
        batch_tokens: int | None,
        max_batch: int,
        max_length: int | None,
        prefix_cache: bool,
        cache_dir: str | None,
        ort_lib: str | None,
        memory_limit: str,
    ) -> None: ...
    def embed_documents(self, texts: Iterable[str] | str, dimensions: int | None = None) -> npt.NDArray[np.float32]: ...
    def query_prompt(self, task: str | None = None, examples: _Examples = None) -> QueryPrompt: ...
    def embed_queries(
        self, prompt: QueryPrompt, texts: Iterable[str] | str, dimensions: int | None = None
    ) -> npt.NDArray[np.float32]: ...
    @property
    def info(self) -> Info: ...
    @property
    def prefix_stats(self) -> dict[str, int]: ...
