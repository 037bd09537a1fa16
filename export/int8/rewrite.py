"""Graph rewriting: an fp32 graph quantized with a recipe (`quantize_graph`), written one weight at
a time into `dst` + `.data`, never holding a whole fp32 graph in memory.

The fp32 graph's weights come from `load(name)`: read from an exported fp32 graph's data file
(`read_weight`), or from the checkpoint for a traced graph whose weights have no data
(`weights_as_initializers`, `calibrate.Fp32Model.from_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..stream import DataFile
from .recipes import Recipe
from .tensors import outlier_channels, quantize_embedding_rows, quantize_matmul_weight, quantize_nbits_weight

log = logging.getLogger(__name__)

Load = Callable[[str], np.ndarray]
Raw = Callable[[onnx.TensorProto], bytes]


def read_raw(tensor: onnx.TensorProto, base: Path) -> bytes:
    """The bytes of an initializer stored in an external data file under `base`."""
    info = {e.key: e.value for e in tensor.external_data}
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return f.read(int(length)) if length is not None else f.read()


def read_weight(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    """An fp32 initializer's data, external (under `base`) or inline."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raw = read_raw(tensor, base)
        return np.frombuffer(raw, dtype=np.float32).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def eligible(graph: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D float32 initializer and whose first is not."""
    out = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = inits.get(node.input[1])
        if w is None or node.input[0] in inits:
            continue
        if len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            out.append(node)
    return out


def _is_embedding(node: onnx.NodeProto, inits: dict) -> bool:
    """The token embedding lookup: Gather(2-D float32 initializer, input_ids) along axis 0."""
    if node.op_type != "Gather" or node.input[0] not in inits or node.input[1] != "input_ids":
        return False
    t = inits[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return axis == 0 and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT


def weights_as_initializers(model: onnx.ModelProto, inputs: set[str]) -> None:
    """Turn the graph inputs named in `inputs` (a traced graph's weights, `stream.trace`) into
    initializers without data (name, type, shape), for `quantize_graph` to fill from its loader."""
    g = model.graph
    for i in [i for i in g.input if i.name in inputs]:
        t = onnx.TensorProto()
        t.name = i.name
        t.data_type = i.type.tensor_type.elem_type
        t.dims.extend(d.dim_value for d in i.type.tensor_type.shape.dim)
        t.data_location = onnx.TensorProto.EXTERNAL  # filled by the loader when written
        g.initializer.append(t)
    keep = [i for i in g.input if i.name not in inputs]
    del g.input[:]
    g.input.extend(keep)


def quantize_graph(
    model: onnx.ModelProto,
    load: Load,
    dst: Path,
    recipe: Recipe,
    stats: dict[str, np.ndarray] | None = None,
    raw: Raw | None = None,
) -> None:
    """`model` quantized with `recipe` into `dst`, its weights read by `load` one at a time (see
    `W8A8Rewriter`). `stats` (per MatMul input, max |x| per channel) is needed by recipes with
    outliers. `raw(tensor)`, if given, returns the bytes of an initializer that is copied unchanged
    (default: `load`'s array)."""
    if recipe.method == "w8a8":
        W8A8Rewriter(model, load, dst, recipe.settings, stats or {}).rewrite(raw)
    elif recipe.method == "matmulnbits":
        rewrite_nbits(model, load, dst, recipe.settings, raw)
    else:
        raise ValueError(f"unknown quantization method {recipe.method!r}")


# --- w8a8: per-token dynamic int8 activations x per-channel int8 weights ------------------------


class W8A8Rewriter:
    """Rewrites every eligible MatMul(x, W) of `model` into per-token u8 x per-channel s8 (+ fp32
    outliers) and saves it as `dst` + `.data`.

    Streams: weights are read, quantized (`quantize_matmul_weight`) and written one tensor at a
    time, so the peak memory is one weight matrix, not a copy of the model. MatMuls matching a
    `keep` regex stay fp32. Each quantized MatMul input (`activation`) and weight (`weight`) is
    written once, whatever the number of MatMuls that share it."""

    def __init__(self, model: onnx.ModelProto, load: Load, dst: Path, settings: dict, stats: dict[str, np.ndarray]):
        s = settings
        if s.get("activations", "u8") != "u8" or s.get("weights", "s8") != "s8":
            raise ValueError(f"w8a8 supports u8 activations x s8 weights, not {s}")
        self.model, self.load, self.dst, self.stats = model, load, dst, stats
        self.embeddings_int8 = s.get("embeddings") == "int8"
        self.weight_bits = int(s.get("weight_bits", 8))
        self.k_out = int(s.get("outliers", 0))
        self.k_by_kind = {kind: int(k) for kind, k in s.get("outliers_by_kind", {}).items()}  # e.g. {"down": 128}
        keep = [re.compile(p) for p in s.get("keep", [])]
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.eligible = eligible(g, self.inits)
        self.targets = [n for n in self.eligible if not any(p.search(n.name) or p.search(n.input[1]) for p in keep)]
        if self.k_out or self.k_by_kind:
            missing = sorted({n.input[0] for n in self.targets} - set(stats))
            if missing:
                raise ValueError(f"no calibration statistics for {len(missing)} MatMul inputs (first: {missing[0]})")
        self.counter = 0
        self.writer: DataFile | None = None
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.replaced: dict[str, int] = {}  # weight name: how many of its users were rewritten
        # per MatMul input: (u8 q, row scale [..., 1], gathered outlier channels or None, their indexes)
        self.activations: dict[str, tuple[str, str, str | None, np.ndarray | None]] = {}
        self.weights: dict[str, tuple[str, str, str | None]] = {}  # per weight: (q, scale, outlier rows or None)

    def fresh(self, stem: str) -> str:
        """A new tensor name (numbered in the order the rewrite asks for them)."""
        self.counter += 1
        return f"w8a8_{stem}_{self.counter}"

    def const(self, name: str, arr: np.ndarray) -> str:
        """A new initializer. Large tensors go to the data file straight from the array: a
        TensorProto holding their bytes keeps them in its arena even after ClearField (measured:
        resident memory grew by the whole int8 model, 7 GB at bge-en-icl's size)."""
        self.new_inits.append(self.writer.add(name, arr) if arr.nbytes > 4096 else numpy_helper.from_array(arr, name))
        return name

    def k_for(self, node: onnx.NodeProto) -> int:
        """The outlier channels of `node`'s input: its kind's (`outliers_by_kind`), else `outliers`."""
        for kind, k in self.k_by_kind.items():
            if re.search(rf"[./]{kind}[./]", node.name) or re.search(rf"[./]{kind}[./]", node.input[1]):
                return k
        return self.k_out

    def rewrite(self, raw: Raw | None = None) -> None:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.writer = DataFile(self.dst.parent / (self.dst.name + ".data"))
        self.add_constants()
        target_ids = {id(n) for n in self.targets}
        for node in self.model.graph.node:
            if self.embeddings_int8 and _is_embedding(node, self.inits):
                self.embedding(node)
            elif id(node) in target_ids:
                self.matmul(node)
            else:
                self.new_nodes.append(node)
        save(
            self.model, self.dst, self.writer, self.new_nodes, self.new_inits, self.replaced, self.load, raw, opset=21
        )  # blocked QuantizeLinear
        log.info(
            "w8a8: %d MatMuls rewritten (%d inputs quantized, %d outlier channels each, by kind %s), %d kept fp32",
            len(self.targets),
            len(self.activations),
            self.k_out,
            self.k_by_kind,
            len(self.eligible) - len(self.targets),
        )

    def add_constants(self) -> None:
        """The scalars every quantized MatMul shares."""
        self.c_axes = self.const("w8a8_axes_last", np.array([-1], dtype=np.int64))
        self.c_inv127 = self.const("w8a8_inv127", np.array(1.0 / 127.0, dtype=np.float32))
        self.c_eps = self.const("w8a8_eps", np.array(1e-12, dtype=np.float32))
        self.c_zp = self.const("w8a8_zp", np.array(128, dtype=np.uint8))
        self.c_zp_row = self.const("w8a8_zp_row", np.array([128], dtype=np.uint8))  # expanded to the scale's shape
        self.c_one = self.const("w8a8_one", np.array(1.0, dtype=np.float32))

    def activation(self, a: str, k: int, n_out: int) -> tuple[str, str, str | None, np.ndarray | None]:
        """MatMul input `a` (`k` channels, `n_out` of them outliers) quantized per token: (u8 q, row
        scale [..., 1], gathered outlier channels or None, their indexes)."""
        if a in self.activations:
            return self.activations[a]
        out, fresh = self.new_nodes, self.fresh
        stem = a.strip("/").replace("/", "_")
        idx = outlier_channels(self.stats[a], n_out) if n_out else None
        x, gathered = a, None
        if idx is not None:
            mask = np.ones(k, dtype=np.float32)
            mask[idx] = 0.0
            x, gathered = fresh(stem + "_inliers"), fresh(stem + "_outliers")
            out.append(helper.make_node("Mul", [a, self.const(fresh(stem + "_mask"), mask)], [x]))
            out.append(
                helper.make_node("Gather", [a, self.const(fresh(stem + "_outlier_idx"), idx)], [gathered], axis=-1)
            )
        # max |x| per token from two reductions that only read x (no |x| tensor written), then one
        # blocked QuantizeLinear (opset 21; the block is the whole row, so the scale is per token):
        # it rounds half to even and adds the zero point in one pass, the same bytes as
        # Div, Round, Add and Cast, in a quarter of their time on slice7b's activations.
        hi, lo, neg, amax, sc0, scale, shape, zp, q = (
            fresh(stem + t) for t in ("_max", "_min", "_negmin", "_amax", "_sc0", "_scale", "_shape", "_zp", "_q")
        )
        out.append(helper.make_node("ReduceMax", [x, self.c_axes], [hi], keepdims=1))
        out.append(helper.make_node("ReduceMin", [x, self.c_axes], [lo], keepdims=1))
        out.append(helper.make_node("Neg", [lo], [neg]))
        out.append(helper.make_node("Max", [hi, neg], [amax]))
        out.append(helper.make_node("Mul", [amax, self.c_inv127], [sc0]))
        out.append(helper.make_node("Max", [sc0, self.c_eps], [scale]))
        out.append(helper.make_node("Shape", [scale], [shape]))
        out.append(helper.make_node("Expand", [self.c_zp_row, shape], [zp]))
        out.append(helper.make_node("QuantizeLinear", [x, scale, zp], [q], axis=-1, block_size=k))
        self.activations[a] = (q, scale, gathered, idx)
        return self.activations[a]

    def weight(self, wname: str, idx: np.ndarray | None) -> tuple[str, str, str | None]:
        """Weight `wname` as int8 initializers: (q, per-column scale, exact outlier rows or None)."""
        if wname not in self.weights:
            parts = quantize_matmul_weight(self.load(wname), idx, self.weight_bits)
            qn = self.const(wname + "_w8", parts["q"])
            sn = self.const(wname + "_w8_scale", parts["scale"])
            on = self.const(wname + "_outlier_rows", parts["outlier_rows"]) if "outlier_rows" in parts else None
            self.weights[wname] = (qn, sn, on)
        return self.weights[wname]

    def matmul(self, node: onnx.NodeProto) -> None:
        """MatMul(x, W) as MatMulIntegerToFloat times the row scale (+ the fp32 outlier product)."""
        out = self.new_nodes
        a, wname = node.input[0], node.input[1]
        (y,) = node.output
        q, rs, gathered, idx = self.activation(a, int(self.inits[wname].dims[0]), self.k_for(node))
        qw, cs, orows = self.weight(wname, idx)
        self.replaced[wname] = self.replaced.get(wname, 0) + 1
        stem = node.name or y
        t = self.fresh(stem + "_mm")
        # Each node gets its own weight zero point: without VNNI, `session.x64quantprecision` makes
        # ONNX Runtime add a uint8 copy of every node's weight and zero point named after the
        # original (`<name>_s8_2_u8`), and a zero point shared by two nodes fails the session.
        wzp = self.const(self.fresh("wzp"), np.array(0, dtype=np.int8))
        out.append(
            helper.make_node(
                "MatMulIntegerToFloat",
                [q, qw, self.c_one, cs, self.c_zp, wzp],
                [t],
                domain="com.microsoft",
                name=stem + "_w8a8",
            )
        )
        if orows is None:
            out.append(helper.make_node("Mul", [t, rs], [y], name=stem + "_rowscale"))
        else:
            t2, o = self.fresh(stem + "_int"), self.fresh(stem + "_fp32")
            out.append(helper.make_node("Mul", [t, rs], [t2], name=stem + "_rowscale"))
            out.append(helper.make_node("MatMul", [gathered, orows], [o], name=stem + "_outliers"))
            out.append(helper.make_node("Add", [t2, o], [y], name=stem + "_sum"))

    def embedding(self, node: onnx.NodeProto) -> None:
        """The token embedding table as int8 rows with one fp32 scale each: Gather both, multiply."""
        out = self.new_nodes
        q, scale = quantize_embedding_rows(self.load(node.input[0]))
        stem = node.name.strip("/").replace("/", "_") or "embed"
        qn, sn = self.const(node.input[0] + "_i8", q), self.const(node.input[0] + "_i8_scale", scale[:, None])
        rows, f, sc = self.fresh(stem + "_rows"), self.fresh(stem + "_float"), self.fresh(stem + "_scale")
        out.append(helper.make_node("Gather", [qn, node.input[1]], [rows], axis=0, name=stem + "_int8"))
        out.append(helper.make_node("Cast", [rows], [f], to=onnx.TensorProto.FLOAT))
        out.append(helper.make_node("Gather", [sn, node.input[1]], [sc], axis=0, name=stem + "_row_scale"))
        out.append(helper.make_node("Mul", [f, sc], [node.output[0]], name=stem + "_dequantize"))
        self.replaced[node.input[0]] = self.replaced.get(node.input[0], 0) + 1


def save(
    model: onnx.ModelProto,
    dst: Path,
    writer: DataFile,
    new_nodes: list,
    new_inits: list,
    replaced: dict[str, int],
    load: Load,
    raw: Raw | None,
    opset: int,
) -> None:
    """Finish a rewritten graph: drop the weights every user of which was replaced, copy the other
    initializers into `writer`'s data file (`raw(tensor)` or `load(name)`), add `new_inits`, and
    save `dst` with the com.microsoft domain and at least `opset`. (The traced graphs' ops mean
    the same up to opset 21.)"""
    g = model.graph
    uses: dict[str, int] = {}  # in the graph as it was, before `new_nodes` replace its nodes
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    kept = []
    for t in g.initializer:
        if t.name in replaced and replaced[t.name] >= uses.get(t.name, 0):
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            writer.put_raw(t, raw(t) if raw else memoryview(np.ascontiguousarray(load(t.name))).cast("B"))
        kept.append(t)
    writer.close()
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, opset)
    onnx.save(model, os.fspath(dst))


# --- block-wise: MatMulNBits ---------------------------------------------------------------------


def rewrite_nbits(model: onnx.ModelProto, load: Load, dst: Path, s: dict, raw: Raw | None = None) -> None:
    """Every eligible MatMul(x, W) of `model` as `com.microsoft.MatMulNBits` (8-bit weights in
    blocks along K; int8 compute at `accuracy_level` 4, fp32 at 1), written one weight at a time like `W8A8Rewriter`: no whole fp32 graph in memory."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = eligible(g, inits)  # held, so that their ids stay theirs
    ids = {id(n) for n in nodes}
    writer = DataFile(dst.parent / (dst.name + ".data"))
    new_nodes, new_inits, replaced = [], [], {}
    for node in g.node:
        if id(node) not in ids:
            new_nodes.append(node)
            continue
        wname = node.input[1]
        k, n = (int(d) for d in inits[wname].dims)
        if wname not in replaced:  # a weight shared by two MatMuls is written once
            packed, scales = quantize_nbits_weight(load(wname), s)
            new_inits += [writer.add(wname + "_Q8", packed), writer.add(wname + "_scales", scales)]
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], wname + "_Q8", wname + "_scales"],
                list(node.output),
                name=(node.name or wname) + "_Q8",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=int(s["bits"]),
                block_size=int(s["block_size"]),
                accuracy_level=int(s["accuracy_level"]),
            )
        )
        replaced[wname] = replaced.get(wname, 0) + 1
    save(model, dst, writer, new_nodes, new_inits, replaced, load, raw, opset=0)
    log.info("matmulnbits: %d MatMuls rewritten", len(ids))
