"""One exported graph run by ONNX Runtime segment by segment (the embedding and masks, each decoder
layer, the final norm: the graph's own nodes, cut along the `/layers.{i}/` scopes), so a session
holds one layer's weights whatever the model's depth; the hidden states pass from one segment to
the next."""

from __future__ import annotations

import logging
import os
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ..cpu import session_options

log = logging.getLogger(__name__)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def segments(graph: onnx.GraphProto) -> list[list[onnx.NodeProto]]:
    """The graph's nodes cut into runs: everything before the first layer, then each `/layers.{i}/`
    scope (the last one also takes what follows it: the final norm).

    The TorchScript exporter names every node after its module scope (`/layers.3/q/MatMul`,
    `/norm/Mul`, `/Cast`), but a rewritten graph need not keep a layer's nodes together
    (`MatMulNBitsQuantizer` sorts the graph again, moving constants and root-scope nodes between
    layers). So a node goes to its own layer's segment when it names one, else to the latest segment
    among the producers of its inputs (the first, for a node without any), and the segments run in
    order: every node's inputs come from its own segment or an earlier one. Within a segment nodes keep
    graph (execution) order."""
    rank_of: dict[str, int] = {}
    ranks: list[int] = []
    for node in graph.node:
        m = re.match(r"/layers\.(\d+)/", node.name)
        rank = max((rank_of.get(i, 0) for i in node.input if i), default=0)
        if m:
            rank = max(rank, int(m.group(1)) + 1)
        ranks.append(rank)
        for o in node.output:
            rank_of[o] = rank
    parts: dict[int, list[onnx.NodeProto]] = {}
    for node, rank in zip(graph.node, ranks):
        parts.setdefault(rank, []).append(node)
    return [parts[r] for r in sorted(parts)]


class SegmentedGraph:
    """An exported graph split by `segments`, each saved as its own small graph beside the original
    (so the weights' external-data locations still resolve) and run by its own ONNX Runtime session.

    Or a graph in memory whose weights have no data (`model`: a traced graph after
    `int8.rewrite.weights_as_initializers`) with `load(name)` giving each weight: every segment then gets
    its weights from `load` (the checkpoint) as it is built, and nothing is written. `outputs`:
    more tensors to return (for example a MatMul's input), as if they were graph outputs."""

    def __init__(
        self,
        path: Path | None,
        threads: int = 2,
        model: onnx.ModelProto | None = None,
        load: Callable[[str], np.ndarray] | None = None,
        outputs: list[str] = (),
    ):
        self.path = Path(path) if path is not None else None
        self.threads = threads
        self.load = load
        if model is None:
            model = onnx.load(os.fspath(self.path), load_external_data=False)
        else:
            model = onnx.ModelProto.FromString(model.SerializeToString())  # outputs are added below
        existing = {o.name for o in model.graph.output}
        for name in outputs:
            if name not in existing:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        graph = model.graph
        self.opset = list(model.opset_import)
        self.graph_inputs = {i.name: i for i in graph.input}
        self.graph_outputs = [o.name for o in graph.output]
        self.inits = {t.name: t for t in graph.initializer}
        self.parts = segments(graph)
        produced_by = {}
        for k, part in enumerate(self.parts):
            for node in part:
                for o in node.output:
                    produced_by[o] = k
        self.needs: list[list[str]] = []  # per segment: tensors it reads from earlier segments or graph inputs
        self.gives: list[list[str]] = []  # per segment: tensors later segments or the graph's outputs read
        consumers: dict[str, set[int]] = {}
        for k, part in enumerate(self.parts):
            own = {o for n in part for o in n.output}
            need = []
            for node in part:
                for i in node.input:
                    if i and i not in own and i not in self.inits and i not in need:
                        need.append(i)
                        consumers.setdefault(i, set()).add(k)
            self.needs.append(need)
        for k, part in enumerate(self.parts):
            give = [
                o for n in part for o in n.output if o in self.graph_outputs or any(c > k for c in consumers.get(o, ()))
            ]
            self.gives.append(give)
        self.last_use = {}
        for name, users in consumers.items():
            self.last_use[name] = max(users)
        self.dtypes = self._value_types(model)

    def empty_past(self) -> dict[str, np.ndarray]:
        """Zero-length `past.*` inputs (the plain forward), or {} for a graph without them."""
        empty = {}
        for n, vi in self.graph_inputs.items():
            if n.startswith("past."):
                t = vi.type.tensor_type
                dtype = np.float16 if t.elem_type == onnx.TensorProto.FLOAT16 else np.float32
                empty[n] = np.zeros((1, t.shape.dim[1].dim_value, 0, t.shape.dim[3].dim_value), dtype)
        return empty

    def _value_types(self, model: onnx.ModelProto) -> dict[str, int]:
        """Element type of every tensor crossing a segment boundary (shape inference on the weightless graph)."""
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
        types = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            types[vi.name] = vi.type.tensor_type.elem_type
        return types

    def _segment_model(self, k: int, scratch: Path | None) -> Path | bytes:
        """Segment k's graph: a file beside the original, or (weights from `load`) serialized bytes."""
        part = self.parts[k]
        used = {i for n in part for i in n.input}
        inits = [self.inits[n] for n in used if n in self.inits]
        if self.load is not None:
            inits = [numpy_helper.from_array(self.load(t.name), t.name) if _without_data(t) else t for t in inits]
        inputs = [
            self.graph_inputs[n]
            if n in self.graph_inputs
            else onnx.helper.make_tensor_value_info(n, self.dtypes.get(n, onnx.TensorProto.FLOAT), None)
            for n in self.needs[k]
        ]
        outputs = [
            onnx.helper.make_tensor_value_info(n, self.dtypes.get(n, onnx.TensorProto.FLOAT), None)
            for n in self.gives[k]
        ]
        graph = onnx.helper.make_graph(part, f"segment{k}", inputs, outputs, initializer=inits)
        model = onnx.helper.make_model(graph, opset_imports=self.opset)
        model.ir_version = onnx.IR_VERSION if model.ir_version == 0 else model.ir_version
        if scratch is None:
            return model.SerializeToString()  # one segment: under protobuf's 2 GB at bge-en-icl's size
        path = scratch / f".segment{k}-{os.getpid()}.onnx"
        onnx.save_model(model, os.fspath(path))
        return path

    def run(
        self, runs: list[Run], on_output: Callable[[int, str, np.ndarray], None] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Run several workloads through the graph in lockstep, one segment (one session) at a time;
        returns each run's `keep` outputs. A run with `past_from` = r takes its `past.{i}.*` inputs from
        run r's `present.{i}.*` outputs (run r must come first and keep them): the prefix cache.
        `on_output(run, name, value)` sees every output of every segment as it is made (for
        reducing large ones on the fly instead of keeping them)."""
        values = [dict(run.feeds) for run in runs]
        results: list[dict[str, np.ndarray]] = [dict() for _ in runs]
        opts = session_options(self.threads)
        # Without this, each session's arena stays resident after the session is gone (measured: about
        # 480 MiB more per segment on an 8-layer model); with it the peak is one segment's.
        opts.enable_cpu_mem_arena = False
        start = time.perf_counter()
        for k in range(len(self.parts)):
            segment = self._segment_model(k, self.path.parent if self.load is None else None)
            if isinstance(segment, bytes):
                sess = ort.InferenceSession(segment, opts, providers=["CPUExecutionProvider"])
                del segment
            else:
                try:
                    sess = ort.InferenceSession(os.fspath(segment), opts, providers=["CPUExecutionProvider"])
                finally:
                    segment.unlink()
            for r, run in enumerate(runs):
                for name in self.needs[k]:
                    if name not in values[r] and run.past_from is not None and name.startswith("past."):
                        values[r][name] = results[run.past_from][name.replace("past.", "present.", 1)]
                missing = [n for n in self.needs[k] if n not in values[r]]
                if missing:
                    raise ValueError(f"segment {k} needs {missing}, which no earlier segment gave")
                outs = sess.run(self.gives[k], {n: values[r][n] for n in self.needs[k]})
                for name, value in zip(self.gives[k], outs):
                    if on_output is not None:
                        on_output(r, name, value)
                    if name in run.keep:
                        results[r][name] = value
                    if self.last_use.get(name, -1) > k:
                        values[r][name] = value
                for name in [n for n in values[r] if self.last_use.get(n, -1) <= k]:
                    del values[r][name]
            del sess
            log.info(
                "%s: segment %d/%d run (%.0f s so far, peak RSS %.2f GiB)",
                self.path.parent.name if self.path else "checkpoint",
                k + 1,
                len(self.parts),
                time.perf_counter() - start,
                _peak_rss_gib(),
            )
        return results


def _without_data(t: onnx.TensorProto) -> bool:
    """An initializer that only describes a weight (`int8.rewrite.weights_as_initializers`)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and not any(e.key == "location" for e in t.external_data)


@dataclass
class Run:
    """One workload for `SegmentedGraph.run`: graph inputs, graph outputs to return, prefix source."""

    feeds: dict[str, np.ndarray]
    keep: set[str]
    past_from: int | None = None
