"""Parity of an exported graph against PyTorch fp32.

Every row of one right-padded batch is pooled at its last real token (`sum(mask) - 1`) and
L2-normalised, exactly as the runtime does; the graph's embeddings are compared with PyTorch's by
cosine. A variant whose minimum cosine is under its threshold fails the export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from . import manifest
from .manifest import START_FILE
from .ortrun.batch import Batch, common_prefix, last_token, right_padded, without_start
from .ortrun.segmented import Run, SegmentedGraph

log = logging.getLogger(__name__)

THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}


class VerificationError(RuntimeError):
    pass


def torch_hidden(model: torch.nn.Module, batch: Batch) -> np.ndarray:
    with torch.inference_mode():
        out = model(
            input_ids=torch.from_numpy(batch.input_ids),
            attention_mask=torch.from_numpy(batch.attention_mask),
            position_ids=torch.from_numpy(batch.position_ids),
            use_cache=False,
        )
    return out.last_hidden_state.float().numpy()


def start_ids(tokenizer, graph_inputs) -> list[int]:
    """The ids the tokenizer puts before every text (bge-en-icl: `<s>`), when the graph takes prefix
    states; [] otherwise. Their states are the same in every input: an int8 variant runs on top of
    them computed in fp32 (export/FORMAT.md, `start_states`)."""
    if not any(str(n).startswith("past.") for n in graph_inputs):
        return []
    return list(manifest.wrapping(tokenizer)[0])


def write_start_graph(path: Path, states: dict[str, np.ndarray]) -> None:
    """A graph with no inputs whose outputs, named like the model's `past.*` inputs, are `states`."""
    nodes, inits, outputs = [], [], []
    for name, value in states.items():
        inits.append(numpy_helper.from_array(value, f"{name}.constant"))
        nodes.append(helper.make_node("Identity", [f"{name}.constant"], [name]))
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        outputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
    model = helper.make_model(
        helper.make_graph(nodes, "start_states", [], outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def start_of(graph: Path, quantization: dict | None) -> tuple[list[int], dict[str, np.ndarray]] | None:
    """The start states written beside a quantized `graph` (ids, states), or None."""
    path = graph.with_name(START_FILE)
    ids = ((quantization or {}).get("selection") or {}).get("start_states")
    if not ids or not path.exists():
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return list(ids), dict(zip(names, sess.run(names, {})))


def parity(reference: np.ndarray, embeddings: np.ndarray, threshold: float) -> dict:
    cos = np.sum(reference * embeddings, axis=1)
    return {
        "reference": "pytorch fp32",
        "texts": int(reference.shape[0]),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(reference - embeddings).max()),
        "threshold": float(threshold),
    }


def verify_variant(
    name: str,
    graph: Path,
    batch: Batch,
    reference: np.ndarray,
    threshold: float,
    finite_ids: list[int] | None = None,
    threads: int = 2,
    cache_rows: list[int] | None = None,
    start: tuple[list[int], dict[str, np.ndarray]] | None = None,
) -> dict:
    """Parity figures of one variant; raises VerificationError when it misses `threshold`.

    `cache_rows` (indexes into the batch of queries that share their few-shot prefix) also checks the
    prefix cache: those rows embedded on top of their common prefix's states, against PyTorch.
    `finite_ids` (one long row) must give finite hidden states. `start` (ids every row begins with,
    and their states): rows run without those ids, on top of the states, as the runtime runs them.

    The graph runs under ONNX Runtime one segment at a time (`ortrun.segmented.SegmentedGraph`:
    embeddings, each decoder layer, final norm; the graph's own nodes), all workloads in lockstep,
    so at most one layer's weights are loaded whatever the model's depth.
    """
    segmented = SegmentedGraph(graph, threads)
    empty = segmented.empty_past()
    presents = {n for n in segmented.graph_outputs if n.startswith("present.")}
    k = len(start[0]) if start else 0
    if k and not (batch.input_ids[:, :k] == np.array(start[0])).all():
        raise ValueError(f"start states given for {start[0]}, but not every row begins with them")
    first = {**empty, **start[1]} if start else empty
    runs = [Run({**without_start(batch, k).feeds(), **first}, {"last_hidden_state"})]
    cache = None
    if cache_rows and empty:
        rows = [batch.row(i).input_ids[0].tolist() for i in cache_rows]
        prefix_len = common_prefix(rows) - 1  # at least one new token per row
        cached = right_padded([r[prefix_len:] for r in rows], 0)
        cached.position_ids = np.where(cached.attention_mask == 1, cached.position_ids + prefix_len, 0)
        runs.append(Run({**without_start(right_padded([rows[0][:prefix_len]], 0), k).feeds(), **first}, presents))
        runs.append(Run(cached.feeds(), {"last_hidden_state"}, past_from=len(runs) - 1))
        cache = (len(runs) - 1, cached, prefix_len)
    if finite_ids is not None:
        runs.append(Run({**right_padded([finite_ids], 0).feeds(), **empty}, {"last_hidden_state"}))
    results = segmented.run(runs)

    embeddings = last_token(results[0]["last_hidden_state"], batch.attention_mask[:, k:])
    result = parity(reference, embeddings, threshold)
    log.info(
        "%s parity: min cos %.7f, mean cos %.7f, max abs diff %.2e (threshold %s)",
        name,
        result["min_cosine"],
        result["mean_cosine"],
        result["max_abs_diff"],
        threshold,
    )
    if finite_ids is not None:
        hidden = results[-1]["last_hidden_state"]
        if not np.isfinite(hidden).all():
            bad = int((~np.isfinite(hidden)).sum())
            raise VerificationError(f"{bad} non-finite values in the hidden states of a {len(finite_ids)}-token input")
        log.info("%s: %d-token input finite", name, len(finite_ids))
    if not result["min_cosine"] >= threshold:
        raise VerificationError(
            f"variant {name} failed verification: min cosine {result['min_cosine']:.7f} "
            f"against PyTorch fp32 is under the threshold {threshold}"
        )
    if cache is not None:
        index, cached, prefix_len = cache
        got = last_token(results[index]["last_hidden_state"], cached.attention_mask)
        figures = parity(reference[cache_rows], got, threshold)
        figures["prefix_tokens"] = prefix_len
        log.info("%s prefix cache (%d-token prefix): min cos %.7f", name, prefix_len, figures["min_cosine"])
        if not figures["min_cosine"] >= threshold:
            raise VerificationError(
                f"variant {name} failed verification with the prefix cache: min cosine "
                f"{figures['min_cosine']:.7f} against PyTorch fp32 is under the threshold {threshold}"
            )
        result["prefix_cache"] = figures
    return result
