"""The fp32 model the int8 recipes are measured against and quantized from (`Fp32Model`), and the
calibration texts it runs: `calibration.txt` plus one- and two-token inputs, each alone, one layer
at a time. One pass gives the reference embeddings, the start states and the per-channel max |x|
of every quantizable MatMul input (the outlier channel lists)."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .. import samples
from ..ortrun.batch import last_token, right_padded
from ..ortrun.segmented import Run, SegmentedGraph
from ..stream import weight_inputs, weight_reader
from .recipes import Recipe
from .rewrite import eligible, quantize_graph, read_raw, read_weight, weights_as_initializers

log = logging.getLogger(__name__)

CALIBRATION = Path(__file__).parents[1] / "calibration.txt"
# One- and two-token inputs (with the tokenizer's own special tokens added): the inputs whose last
# token sits next to position 0's huge activations. Not taken from the shared test data.
# fmt: off
SHORT_TEXTS = ["", "ok", "No", "cat", "Why?", "blue sky", "It works.",
               # one-word labels, the kind classification passages are made of (not the shared data's)
               "sports", "happy", "angry", "finance", "python", "rain", "dog", "yes", "false", "news",
               "travel", "health", "kitchen", "red", "seven", "Monday", "science", "art", "food",
               "sad", "spam", "business", "question", "fear", "surprise", "politics", "alarm", "joke"]
# fmt: on


def calibration_rows(tokenizer, max_length: int = 512, family=None) -> list[list[int]]:
    """Token ids of the calibration texts as documents, then the short texts (one and two tokens);
    `family` (export/family.py) for the ids its procedure puts around a text."""
    texts = [t.strip("\n") for t in CALIBRATION.read_text(encoding="utf-8").split("\n----\n") if t.strip()]
    rows = [samples.encode_document(tokenizer, t, max_length, family) for t in texts]
    rows += [samples.encode_document(tokenizer, t, max_length, family) for t in SHORT_TEXTS]
    return [r for r in rows if r]


def calibrate(fp32_graph: Path, rows: list[list[int]], threads: int = 2) -> dict[str, np.ndarray]:
    """Per-channel max |x| of every quantizable MatMul's input over `rows` (each run alone)."""
    return Fp32Model.from_graph(fp32_graph).measure(rows, [], threads).stats


@dataclass
class Fp32Measure:
    reference: np.ndarray  # last-token embeddings of the rows, each run alone
    start: tuple[list[int], dict[str, np.ndarray]] | None  # the start ids and their fp32 states
    stats: dict[str, np.ndarray]  # per quantizable MatMul input: max |x| per channel over the rows
    seconds: float


@dataclass
class Fp32Model:
    """The fp32 model that `choose` measures the int8 recipes against and quantizes them from: an
    exported fp32 graph file (`from_graph`), or the traced graph with its weights read from the
    checkpoint as needed (`from_checkpoint`), which is never written: at bge-en-icl's size the fp32
    graph is 28.5 GB of disk and more memory than a 24 GB machine has, so it is only ever run one
    layer at a time (`ortrun.segmented.SegmentedGraph`)."""

    graph: onnx.ModelProto  # weights as initializers, with data (a file) or without (the checkpoint)
    load: Callable[[str], np.ndarray]
    path: Path | None = None
    raw: Callable[[onnx.TensorProto], bytes] | None = None

    @classmethod
    def from_graph(cls, path: Path) -> Fp32Model:
        model = onnx.load(os.fspath(path), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        return cls(model, lambda name: read_weight(inits[name], path.parent), path, lambda t: read_raw(t, path.parent))

    @classmethod
    def from_checkpoint(cls, traced: onnx.ModelProto, checkpoint) -> Fp32Model:
        """`traced`: `stream.trace` of the fp32 skeleton (weights as graph inputs; not modified)."""
        model = onnx.ModelProto.FromString(traced.SerializeToString())
        weights_as_initializers(model, set(weight_inputs(model)))
        return cls(model, weight_reader(checkpoint))

    def input_names(self) -> list[str]:
        return [i.name for i in self.graph.graph.input]

    def measure(self, rows: list[list[int]], start_ids: list[int], threads: int = 2) -> Fp32Measure:
        """One pass over the model, one layer at a time: each row alone (reference embeddings and the
        statistics of every quantizable MatMul input) and `start_ids` (their key/value states)."""
        inits = {t.name: t for t in self.graph.graph.initializer}
        names = sorted({n.input[0] for n in eligible(self.graph.graph, inits)})
        if self.path is not None:
            segmented = SegmentedGraph(self.path, threads, outputs=names)
        else:
            segmented = SegmentedGraph(None, threads, model=self.graph, load=self.load, outputs=names)
        empty = segmented.empty_past()
        runs = [Run({**right_padded([row], 0).feeds(), **empty}, {"last_hidden_state"}) for row in rows]
        presents = {n for n in segmented.graph_outputs if n.startswith("present.")}
        if start_ids:
            runs.append(Run({**right_padded([start_ids], 0).feeds(), **empty}, presents))
        wanted = set(names)
        stats: dict[str, np.ndarray] = {}

        def reduce(run: int, name: str, value: np.ndarray) -> None:
            if name in wanted and run < len(rows):
                m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                stats[name] = m if name not in stats else np.maximum(stats[name], m)

        began = time.perf_counter()
        results = segmented.run(runs, reduce)
        seconds = time.perf_counter() - began
        ones = [np.ones((1, len(row)), dtype=np.int64) for row in rows]
        reference = np.stack([last_token(results[i]["last_hidden_state"], ones[i])[0] for i in range(len(rows))])
        start = None
        if start_ids:
            start = (list(start_ids), {n.replace("present.", "past.", 1): v for n, v in results[-1].items()})
        return Fp32Measure(reference, start, stats, seconds)

    def quantize(self, recipe: Recipe, dst: Path, stats: dict[str, np.ndarray] | None) -> None:
        """Write `dst` with `recipe`, one weight in memory at a time (every method)."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize_graph(
            onnx.ModelProto.FromString(self.graph.SerializeToString()), self.load, dst, recipe, stats, self.raw
        )
        log.info("quantized %s with %s", dst, recipe.name)


def quantize(src: Path, dst: Path, recipe: Recipe, stats: dict[str, np.ndarray] | None = None) -> None:
    """Write `dst` (+ `dst.name + ".data"`) from the fp32 graph `src`.

    `stats` (from `calibrate`) is needed by recipes with `outliers`.
    """
    Fp32Model.from_graph(src).quantize(recipe, dst, stats)
    gc.collect()
