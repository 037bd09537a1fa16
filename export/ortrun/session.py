"""A whole graph in one ONNX Runtime session (CPU, the exporter's session options)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..cpu import session_options
from .batch import Batch, right_padded

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def past_inputs(sess: ort.InferenceSession) -> list[ort.NodeArg]:
    """The graph's prefix-state inputs (`past.{i}.key|value`), in graph order; [] for a graph without."""
    return [i for i in sess.get_inputs() if i.name.startswith("past.")]


def empty_past(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Zero-length prefix states: the plain forward."""
    return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), _NUMPY[i.type]) for i in past_inputs(sess)}


def onnx_hidden(sess: ort.InferenceSession, batch: Batch, past: dict[str, np.ndarray] | None = None) -> np.ndarray:
    feeds = batch.feeds()
    feeds.update(empty_past(sess) if past is None else past)
    (out,) = sess.run(["last_hidden_state"], feeds)
    return out


def prefix_states(sess: ort.InferenceSession, prefix: list[int]) -> dict[str, np.ndarray]:
    """Run `prefix` alone; its `present.*` outputs renamed as the next run's `past.*` inputs."""
    names = [i.name.replace("past.", "present.", 1) for i in past_inputs(sess)]
    outs = sess.run(names, {**right_padded([prefix], 0).feeds(), **empty_past(sess)})
    return {name.replace("present.", "past.", 1): out for name, out in zip(names, outs)}
