"""The `int8` variant: each model gets the fastest 8-bit recipe that stays faithful on it.

Recipes (`RECIPES`, fastest first, speeds in export/README.md):

- `w8a8*` (method "w8a8", `_w8a8`): every MatMul whose second input is a 2-D float initializer
  becomes per-token dynamic uint8 activations (zero point 128, scale max|row| / 127) x
  per-output-channel symmetric int8 weights through `com.microsoft.MatMulIntegerToFloat` (ONNX
  Runtime's u8 x s8 GEMM: VNNI on AVX-512 VNNI / AVX-VNNI CPUs). Options:
  - `outliers: k`: the k input channels of each MatMul input with the largest calibrated |x| are
    taken out of the int8 product (masked to 0 before the per-token scale is taken) and computed
    in fp32 by a small `[.., k] x [k, N]` MatMul added to the result (static outlier
    decomposition, LLM.int8()-style but with a fixed channel list);
  - `keep`: regexes on MatMul node or weight names that stay fp32;
  - `embeddings: "int8"` (every w8a8 recipe): the token embedding table as int8 rows with one
    fp32 scale per row (Gather, Cast, times the gathered scale): a quarter of its fp32 size, which
    is most of a shallow stand-in's weights and 0.5 GB of bge-en-icl's.
- `nbits8-acc1` (method "matmulnbits"): 8-bit weight-only `MatMulNBits`, blocks of 32, fp32
  compute: faithful on every model measured, but slower than fp32 (it expands the weights on every
  run). The last resort.

u8 x s8 and CPUs without VNNI: ONNX Runtime's AVX2 u8 x s8 kernel sums pairs of products in int16
(`vpmaddubsw`) and saturates with full-range 8-bit weights. The session option
`session.x64quantprecision=1` makes ONNX Runtime rewrite the s8 weights of MatMulIntegerToFloat
(and MatMulInteger, QGemm, ...) to u8 at load (`Avx2WeightS8ToU8Transformer`, applied only when
`MlasPlatformU8S8Overflow()`); the runtime sets it where the CPU lacks VNNI, so one package is exact
on both (src/runtime.rs).

Start states: when the tokenizer puts the same ids before every text (bge-en-icl's `<s>`), their
key/value states are constants. `choose` computes them with the fp32 graph, writes them beside the
int8 graph (`START_FILE`, FORMAT.md `start_states`) and measures the candidates running on top of
them, as the runtime does: position 0, where a trained model keeps its huge attention-sink
activations, is never quantized.

`choose()` is what the exporter calls: it quantizes with each recipe in order and keeps the first
whose last-token embeddings on the calibration texts (`calibration.txt` plus one- and two-token
inputs; each text alone, but the weight-only candidate in right-padded batches) meet
`FIDELITY` against the fp32 graph; the manifest records the recipe and what every tried recipe
measured. A candidate runs one layer at a time, the shortest texts first, and stops as soon as it
can no longer meet `FIDELITY` (`measure_candidate`), so the recipes that miss cost little more
than their writing.

Per tensor: `quantize_matmul_weight(w, outliers)` turns one fp32 `[in, out]` weight (and the
static outlier channel list of its input) into the int8 initializers, `quantize_nbits_weight` into
`MatMulNBits`' blocks, so every recipe is written weight by weight (`quantize_graph`), from an fp32
graph's data file or straight from the checkpoint, never from a whole fp32 graph in memory.

`python -m export.quantize --model DIR --fp32 GRAPH` measures every recipe (fidelity on the
calibration set and speed, each text alone) against the fp32 graph.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

from .cpu import cpu_class
from .manifest import START_FILE

log = logging.getLogger(__name__)

CALIBRATION = Path(__file__).with_name("calibration.txt")
# One- and two-token inputs (with the tokenizer's own special tokens added): the inputs whose last
# token sits next to position 0's huge activations. Not taken from the shared test data.
SHORT_TEXTS = ["", "ok", "No", "cat", "Why?", "blue sky", "It works.",
               # one-word labels, the kind classification passages are made of (not the shared data's)
               "sports", "happy", "angry", "finance", "python", "rain", "dog", "yes", "false", "news",
               "travel", "health", "kitchen", "red", "seven", "Monday", "science", "art", "food",
               "sad", "spam", "business", "question", "fear", "surprise", "politics", "alarm", "joke"]
# The int8 variant must meet both on the calibration texts (the export's sample check stays at
# verify.THRESHOLDS["int8"]).
FIDELITY = {"min_cosine": 0.99, "mean_cosine": 0.999}
# The weight-only candidate expands its weights on every run, so it runs the calibration texts in
# batches of this many padded tokens (slice7b: 52 s against 260 s alone). 1024 rather than 4096:
# at 8 layers 87 s against 126 s, and 1.2 GiB of activations against 2.1 (less padding, smaller
# attention scores). The w8a8 candidates have no per-run cost and run each text alone: batched,
# the padding made them 1.3x slower (smollm2: 12.3 s against 9.2 s).
SELECTION_BATCH_TOKENS = 1024
# A candidate runs these shortest calibration texts first, and the others only if it can still
# meet the thresholds after them (`measure_candidate`).
FIRST_ROUND = 8


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str  # "w8a8" or "matmulnbits"
    settings: dict = field(default_factory=dict)

    @property
    def kernel(self) -> str:
        """The speed class the runtime's `--variant auto` reads (FORMAT.md)."""
        if self.method == "w8a8":
            return "u8s7" if self.settings.get("weight_bits") == 7 else "u8s8"
        return "matmulnbits-fp32" if self.settings.get("accuracy_level") == 1 else "matmulnbits-int8"

    def describe(self) -> dict:
        """The manifest's `quantization` field (before `choose` adds the selection)."""
        return {"recipe": self.name, "method": self.method, "kernel": self.kernel, **self.settings}


def _w8(name: str, **extra) -> Recipe:
    return Recipe(name, "w8a8", {"activations": "u8", "weights": "s8", "embeddings": "int8", **extra})


_ATTN_IN = r"[./](q|k|v)[./]"
_DOWN = r"[./]down[./]"

# The w8a8 recipes, fastest first (slice7b, AVX-512 VNNI, 2 threads; export/README.md).
_W8A8 = {
    "": {},
    "-o8": {"outliers": 8},
    "-o32": {"outliers": 32},
    "-o32-down128": {"outliers": 32, "outliers_by_kind": {"down": 128}},
    "-o64-down256": {"outliers": 64, "outliers_by_kind": {"down": 256}},
    "-o32-down-fp32": {"outliers": 32, "keep": [_DOWN]},
}
# Each comes twice: with 7-bit weights (`w7a8*`, -63..63) first, then 8-bit (`w8a8*`). 7-bit
# weights keep ONNX Runtime's u8 x s8 GEMM exact on CPUs without VNNI (its int16 pair sums cannot
# saturate: 2 x 255 x 63 < 32767), so it runs there as is, 1.84x fp32 on slice7b against 1.35x for
# 8-bit weights, which need the slower exact u8 x u8 kernel; with VNNI both run the same kernel.
# They cost fidelity, so `choose` takes the first that is faithful on the model being exported;
# the last resort is weight-only int8.
RECIPES = {
    f"w{bits}a8{suffix}": _w8(f"w{bits}a8{suffix}", **extra, **({"weight_bits": 7} if bits == 7 else {}))
    for suffix, extra in _W8A8.items() for bits in (7, 8)
}
RECIPES["nbits8-acc1"] = Recipe("nbits8-acc1", "matmulnbits",
                                {"bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 1})
CANDIDATES = list(RECIPES)


def quantize(src: Path, dst: Path, recipe: Recipe, stats: dict[str, np.ndarray] | None = None) -> None:
    """Write `dst` (+ `dst.name + ".data"`) from the fp32 graph `src`.

    `stats` (from `calibrate`) is needed by recipes with `outliers`.
    """
    Fp32Model.from_graph(src).quantize(recipe, dst, stats)
    gc.collect()


# --- per tensor -----------------------------------------------------------------------------------


def quantize_matmul_weight(w: np.ndarray, outliers: np.ndarray | None = None, bits: int = 8) -> dict[str, np.ndarray]:
    """One fp32 `[in, out]` MatMul weight as the int8 recipe's initializers.

    Returns `q` (int8 `[in, out]`, symmetric per output column, range -127..127, the rows of
    `outliers` set to 0), `scale` (float32 `[out]`: w ~= q * scale) and, when `outliers` (int64
    input-channel indexes) is given and not empty, `outlier_rows` (float32 `[k, out]`: those rows
    of `w`, exact). The scale is taken over the other rows only. Needs nothing but this weight and
    its channel list, so an exporter can stream the model through it one tensor at a time.
    """
    if w.ndim != 2 or w.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 weight, got {w.dtype} {w.shape}")
    out: dict[str, np.ndarray] = {}
    if outliers is not None and len(outliers):
        outliers = np.asarray(outliers, dtype=np.int64)
        out["outlier_rows"] = np.ascontiguousarray(w[outliers])
        w = w.copy()
        w[outliers] = 0.0
    top = float(2 ** (bits - 1) - 1)  # 127, or 63 for 7-bit weights
    scale = (np.abs(w).max(axis=0) / top).astype(np.float32)
    scale[scale == 0] = 1.0
    out["q"] = np.clip(np.rint(w / scale), -top, top).astype(np.int8)
    out["scale"] = scale
    return out


def outlier_channels(channel_max: np.ndarray, k: int) -> np.ndarray:
    """The `k` input channels with the largest calibrated max |x|, ascending."""
    k = min(k, channel_max.shape[0])
    return np.sort(np.argsort(-channel_max, kind="stable")[:k]).astype(np.int64)


# --- calibration ----------------------------------------------------------------------------------


def calibration_rows(tokenizer, max_length: int = 512) -> list[list[int]]:
    """Token ids of the calibration texts as documents, then the short texts (one and two tokens)."""
    from . import samples

    texts = [t.strip("\n") for t in CALIBRATION.read_text(encoding="utf-8").split("\n----\n") if t.strip()]
    rows = [samples.encode_document(tokenizer, t, max_length) for t in texts]
    rows += [samples.encode_document(tokenizer, t, max_length) for t in SHORT_TEXTS]
    return [r for r in rows if r]


def _eligible(graph: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
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
    layer at a time (`stream.SegmentedGraph`)."""

    graph: onnx.ModelProto  # weights as initializers, with data (a file) or without (the checkpoint)
    load: Callable[[str], np.ndarray]
    path: Path | None = None
    raw: Callable[[onnx.TensorProto], bytes] | None = None

    @classmethod
    def from_graph(cls, path: Path) -> "Fp32Model":
        model = onnx.load(os.fspath(path), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        return cls(model, lambda name: _weight(inits[name], path.parent), path, lambda t: _read_raw(t, path.parent))

    @classmethod
    def from_checkpoint(cls, traced: onnx.ModelProto, checkpoint) -> "Fp32Model":
        """`traced`: `stream.trace` of the fp32 skeleton (weights as graph inputs; not modified)."""
        from . import stream

        model = onnx.ModelProto.FromString(traced.SerializeToString())
        weights_as_initializers(model, set(stream.weight_inputs(model)))
        return cls(model, stream.weight_reader(checkpoint))

    def input_names(self) -> list[str]:
        return [i.name for i in self.graph.graph.input]

    def measure(self, rows: list[list[int]], start_ids: list[int], threads: int = 2) -> Fp32Measure:
        """One pass over the model, one layer at a time: each row alone (reference embeddings and the
        statistics of every quantizable MatMul input) and `start_ids` (their key/value states)."""
        from . import stream, verify

        inits = {t.name: t for t in self.graph.graph.initializer}
        names = sorted({n.input[0] for n in _eligible(self.graph.graph, inits)})
        if self.path is not None:
            segmented = stream.SegmentedGraph(self.path, threads, outputs=names)
        else:
            segmented = stream.SegmentedGraph(None, threads, model=self.graph, load=self.load, outputs=names)
        empty = segmented.empty_past()
        runs = [stream.Run({**verify.right_padded([row], 0).feeds(), **empty}, {"last_hidden_state"}) for row in rows]
        presents = {n for n in segmented.graph_outputs if n.startswith("present.")}
        if start_ids:
            runs.append(stream.Run({**verify.right_padded([start_ids], 0).feeds(), **empty}, presents))
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
        reference = np.stack([verify.last_token(results[i]["last_hidden_state"], ones[i])[0] for i in range(len(rows))])
        start = None
        if start_ids:
            start = (list(start_ids), {n.replace("present.", "past.", 1): v for n, v in results[-1].items()})
        return Fp32Measure(reference, start, stats, seconds)

    def quantize(self, recipe: Recipe, dst: Path, stats: dict[str, np.ndarray] | None) -> None:
        """Write `dst` with `recipe`, one weight in memory at a time (every method)."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize_graph(onnx.ModelProto.FromString(self.graph.SerializeToString()), self.load, dst, recipe,
                       stats, self.raw)
        log.info("quantized %s with %s", dst, recipe.name)


# --- w8a8: per-token dynamic int8 activations x per-channel int8 weights ------------------------


def _read_raw(tensor: onnx.TensorProto, base: Path) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return f.read(int(length)) if length is not None else f.read()


def _weight(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raw = _read_raw(tensor, base)
        return np.frombuffer(raw, dtype=np.float32).reshape(tuple(tensor.dims))
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _is_embedding(node: onnx.NodeProto, inits: dict) -> bool:
    """The token embedding lookup: Gather(2-D float32 initializer, input_ids) along axis 0."""
    if node.op_type != "Gather" or node.input[0] not in inits or node.input[1] != "input_ids":
        return False
    t = inits[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return axis == 0 and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT


def weights_as_initializers(model: onnx.ModelProto, inputs: set[str]) -> None:
    """Turn the graph inputs named in `inputs` (a traced graph's weights, `stream.trace`) into
    initializers without data (name, type, shape), for `_w8a8` to fill from its loader."""
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


def quantize_graph(model: onnx.ModelProto, load, dst: Path, recipe: Recipe, stats: dict[str, np.ndarray] | None = None,
                   raw=None) -> None:
    """`model` quantized with `recipe` into `dst`, its weights read by `load` one at a time (see `_w8a8`)."""
    if recipe.method == "w8a8":
        _w8a8(model, load, dst, recipe.settings, stats or {}, raw)
    elif recipe.method == "matmulnbits":
        _nbits(model, load, dst, recipe.settings, raw)
    else:
        raise ValueError(f"unknown quantization method {recipe.method!r}")


def _w8a8(model: onnx.ModelProto, load, dst: Path, s: dict, stats: dict[str, np.ndarray], raw=None) -> None:
    """Rewrite every eligible MatMul(x, W) of `model` into per-token u8 x per-channel s8 (+ fp32
    outliers) and save it as `dst` + `.data`. `load(name)` returns an initializer's fp32 data: read
    from the fp32 graph's data file (`quantize`), or from the checkpoint for a traced graph whose
    weights have no data (`weights_as_initializers`, `Fp32Model.from_checkpoint`).

    Streams: weights are read, quantized (`quantize_matmul_weight`) and written one tensor at a
    time, so the peak memory is one weight matrix, not a copy of the model. MatMuls matching a
    `keep` regex stay fp32. `raw(tensor)`, if given, returns the bytes of an initializer that is
    copied unchanged (default: `load`'s array).
    """
    from onnx import helper, numpy_helper

    if s.get("activations", "u8") != "u8" or s.get("weights", "s8") != "s8":
        raise ValueError(f"w8a8 supports u8 activations x s8 weights, not {s}")
    k_out = int(s.get("outliers", 0))
    k_by_kind = {kind: int(k) for kind, k in s.get("outliers_by_kind", {}).items()}  # e.g. {"down": 128}
    keep = [re.compile(p) for p in s.get("keep", [])]

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    eligible = _eligible(g, inits)
    targets = [n for n in eligible if not any(p.search(n.name) or p.search(n.input[1]) for p in keep)]
    target_ids = {id(n) for n in targets}
    def k_for(node: onnx.NodeProto) -> int:
        for kind, k in k_by_kind.items():
            if re.search(rf"[./]{kind}[./]", node.name) or re.search(rf"[./]{kind}[./]", node.input[1]):
                return k
        return k_out

    if k_out or k_by_kind:
        missing = sorted({n.input[0] for n in targets} - set(stats))
        if missing:
            raise ValueError(f"no calibration statistics for {len(missing)} MatMul inputs (first: {missing[0]})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    from .stream import DataFile

    writer = DataFile(dst.parent / (dst.name + ".data"))
    new_inits: list[onnx.TensorProto] = []
    counter = [0]

    def fresh(stem: str) -> str:
        counter[0] += 1
        return f"w8a8_{stem}_{counter[0]}"

    def const(name: str, arr: np.ndarray) -> str:
        # Large tensors go to the data file straight from the array: a TensorProto holding their bytes
        # keeps them in its arena even after ClearField (measured: resident memory grew by the
        # whole int8 model, 7 GB at bge-en-icl's size).
        new_inits.append(writer.add(name, arr) if arr.nbytes > 4096 else numpy_helper.from_array(arr, name))
        return name

    c_axes = const("w8a8_axes_last", np.array([-1], dtype=np.int64))
    c_inv127 = const("w8a8_inv127", np.array(1.0 / 127.0, dtype=np.float32))
    c_eps = const("w8a8_eps", np.array(1e-12, dtype=np.float32))
    c_zp = const("w8a8_zp", np.array(128, dtype=np.uint8))
    c_zp_row = const("w8a8_zp_row", np.array([128], dtype=np.uint8))  # expanded to the scale's shape
    c_one = const("w8a8_one", np.array(1.0, dtype=np.float32))
    activations: dict[str, tuple[str, str, str | None, np.ndarray | None]] = {}
    weights: dict[str, tuple[str, str, str | None]] = {}

    def quant_activation(a: str, k: int, n_out: int, out: list) -> tuple[str, str, str | None, np.ndarray | None]:
        """(u8 q, row scale [..., 1], gathered outlier channels or None, their indexes)."""
        if a in activations:
            return activations[a]
        stem = a.strip("/").replace("/", "_")
        idx = outlier_channels(stats[a], n_out) if n_out else None
        x, gathered = a, None
        if idx is not None:
            mask = np.ones(k, dtype=np.float32)
            mask[idx] = 0.0
            x, gathered = fresh(stem + "_inliers"), fresh(stem + "_outliers")
            out.append(helper.make_node("Mul", [a, const(fresh(stem + "_mask"), mask)], [x]))
            out.append(helper.make_node("Gather", [a, const(fresh(stem + "_outlier_idx"), idx)], [gathered], axis=-1))
        # max |x| per token from two reductions that only read x (no |x| tensor written), then one
        # blocked QuantizeLinear (opset 21; the block is the whole row, so the scale is per token):
        # it rounds half to even and adds the zero point in one pass, the same bytes as
        # Div, Round, Add and Cast, in a quarter of their time on slice7b's activations.
        hi, lo, neg, amax, sc0, scale, shape, zp, q = (fresh(stem + t) for t in (
            "_max", "_min", "_negmin", "_amax", "_sc0", "_scale", "_shape", "_zp", "_q"))
        out.append(helper.make_node("ReduceMax", [x, c_axes], [hi], keepdims=1))
        out.append(helper.make_node("ReduceMin", [x, c_axes], [lo], keepdims=1))
        out.append(helper.make_node("Neg", [lo], [neg]))
        out.append(helper.make_node("Max", [hi, neg], [amax]))
        out.append(helper.make_node("Mul", [amax, c_inv127], [sc0]))
        out.append(helper.make_node("Max", [sc0, c_eps], [scale]))
        out.append(helper.make_node("Shape", [scale], [shape]))
        out.append(helper.make_node("Expand", [c_zp_row, shape], [zp]))
        out.append(helper.make_node("QuantizeLinear", [x, scale, zp], [q], axis=-1, block_size=k))
        activations[a] = (q, scale, gathered, idx)
        return activations[a]

    def quant_weight(wname: str, idx: np.ndarray | None) -> tuple[str, str, str | None]:
        if wname not in weights:
            parts = quantize_matmul_weight(load(wname), idx, int(s.get("weight_bits", 8)))
            qn = const(wname + "_w8", parts["q"])
            sn = const(wname + "_w8_scale", parts["scale"])
            on = const(wname + "_outlier_rows", parts["outlier_rows"]) if "outlier_rows" in parts else None
            weights[wname] = (qn, sn, on)
        return weights[wname]

    def gather_int8(node: onnx.NodeProto, out: list) -> None:
        """The token embedding table as int8 rows with one fp32 scale each: Gather both, multiply."""
        table = load(node.input[0])
        scale = (np.abs(table).max(axis=1) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
        stem = node.name.strip("/").replace("/", "_") or "embed"
        qn, sn = const(node.input[0] + "_i8", q), const(node.input[0] + "_i8_scale", scale[:, None])
        rows, f, sc = fresh(stem + "_rows"), fresh(stem + "_float"), fresh(stem + "_scale")
        out.append(helper.make_node("Gather", [qn, node.input[1]], [rows], axis=0, name=stem + "_int8"))
        out.append(helper.make_node("Cast", [rows], [f], to=onnx.TensorProto.FLOAT))
        out.append(helper.make_node("Gather", [sn, node.input[1]], [sc], axis=0, name=stem + "_row_scale"))
        out.append(helper.make_node("Mul", [f, sc], [node.output[0]], name=stem + "_dequantize"))
        replaced[node.input[0]] = replaced.get(node.input[0], 0) + 1

    new_nodes: list[onnx.NodeProto] = []
    replaced: dict[str, int] = {}
    for node in g.node:
        if s.get("embeddings") == "int8" and _is_embedding(node, inits):
            gather_int8(node, new_nodes)
            continue
        if id(node) not in target_ids:
            new_nodes.append(node)
            continue
        a, wname = node.input[0], node.input[1]
        (y,) = node.output
        q, rs, gathered, idx = quant_activation(a, int(inits[wname].dims[0]), k_for(node), new_nodes)
        qw, cs, orows = quant_weight(wname, idx)
        replaced[wname] = replaced.get(wname, 0) + 1
        stem = node.name or y
        t = fresh(stem + "_mm")
        # Each node gets its own weight zero point: without VNNI, `session.x64quantprecision` makes
        # ONNX Runtime add a uint8 copy of every node's weight and zero point named after the
        # original (`<name>_s8_2_u8`), and a zero point shared by two nodes fails the session.
        wzp = const(fresh("wzp"), np.array(0, dtype=np.int8))
        new_nodes.append(helper.make_node("MatMulIntegerToFloat", [q, qw, c_one, cs, c_zp, wzp], [t],
                                          domain="com.microsoft", name=stem + "_w8a8"))
        if orows is None:
            new_nodes.append(helper.make_node("Mul", [t, rs], [y], name=stem + "_rowscale"))
        else:
            t2, o = fresh(stem + "_int"), fresh(stem + "_fp32")
            new_nodes.append(helper.make_node("Mul", [t, rs], [t2], name=stem + "_rowscale"))
            new_nodes.append(helper.make_node("MatMul", [gathered, orows], [o], name=stem + "_outliers"))
            new_nodes.append(helper.make_node("Add", [t2, o], [y], name=stem + "_sum"))

    _save(model, dst, writer, new_nodes, new_inits, replaced, load, raw, opset=21)  # blocked QuantizeLinear
    log.info("w8a8: %d MatMuls rewritten (%d inputs quantized, %d outlier channels each, by kind %s), %d kept fp32",
             len(targets), len(activations), k_out, k_by_kind, len(eligible) - len(targets))


def _save(model: onnx.ModelProto, dst: Path, writer, new_nodes: list, new_inits: list, replaced: dict[str, int],
          load, raw, opset: int) -> None:
    """Finish a rewritten graph: drop the weights every user of which was replaced, copy the other
    initializers into `writer`'s data file (`raw(tensor)` or `load(name)`), add `new_inits`, and
    save `dst` with the com.microsoft domain and at least `opset`. (The traced graphs' ops mean
    the same up to opset 21.)"""
    from onnx import helper

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


# --- weight-only: MatMulNBits ---------------------------------------------------------------------


def quantize_nbits_weight(w: np.ndarray, s: dict) -> tuple[np.ndarray, np.ndarray]:
    """One fp32 `[K, N]` MatMul weight as `MatMulNBits`' `B` (uint8 `[N, K / block, block]`) and
    scales (`[N, K / block]`), by ONNX Runtime's own kernel (`quantize_matmul_8bits`, what its
    `MatMulNBitsQuantizer` calls for each weight), so the bytes are the quantizer's."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    if s["bits"] != 8 or not s["symmetric"]:
        raise ValueError(f"MatMulNBits recipes take symmetric 8-bit weights, not {s}")
    if w.ndim != 2 or w.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 weight, got {w.dtype} {w.shape}")
    k, n = w.shape
    block = int(s["block_size"])
    blocks = (k + block - 1) // block
    if blocks * block != k:
        w = np.pad(w, ((0, blocks * block - k), (0, 0)))
    packed = np.zeros((n, blocks, block), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, blocks), dtype=np.uint8)  # unused when symmetric
    quantize_matmul_8bits(packed, np.ascontiguousarray(w), scales, zero_points, block, n, blocks * block, True)
    return packed, scales


def _nbits(model: onnx.ModelProto, load, dst: Path, s: dict, raw=None) -> None:
    """Every eligible MatMul(x, W) of `model` as `com.microsoft.MatMulNBits` (weight-only, blocks
    along K), written one weight at a time like `_w8a8`: no whole fp32 graph in memory."""
    from onnx import helper

    from .stream import DataFile

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = _eligible(g, inits)  # held, so that their ids stay theirs
    eligible = {id(n) for n in nodes}
    writer = DataFile(dst.parent / (dst.name + ".data"))
    new_nodes, new_inits, replaced = [], [], {}
    for node in g.node:
        if id(node) not in eligible:
            new_nodes.append(node)
            continue
        wname = node.input[1]
        k, n = (int(d) for d in inits[wname].dims)
        if wname not in replaced:  # a weight shared by two MatMuls is written once
            packed, scales = quantize_nbits_weight(load(wname), s)
            new_inits += [writer.add(wname + "_Q8", packed), writer.add(wname + "_scales", scales)]
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], wname + "_Q8", wname + "_scales"], list(node.output),
            name=(node.name or wname) + "_Q8", domain="com.microsoft", K=k, N=n, bits=int(s["bits"]),
            block_size=int(s["block_size"]), accuracy_level=int(s["accuracy_level"])))
        replaced[wname] = replaced.get(wname, 0) + 1
    _save(model, dst, writer, new_nodes, new_inits, replaced, load, raw, opset=0)
    log.info("matmulnbits: %d MatMuls rewritten", len(eligible))


# --- choosing per model ---------------------------------------------------------------------------


def embed_rows(graph: Path, rows: list[list[int]], threads: int = 2,
               start: tuple[list[int], dict] | None = None, batch_tokens: int = 0) -> tuple[np.ndarray, float]:
    """Last-token embeddings of `rows` and the seconds it took: each row run alone (no padding), or
    with `batch_tokens`, rows of similar length right-padded into batches of at most that many
    tokens (rows x longest; a longer row runs alone). With `start` (ids every row begins with, and
    their states) the rows run on top of those states."""
    from . import verify

    sess = verify.session(graph, threads)
    result = _embed(sess, rows, start, batch_tokens)
    del sess
    return result


def _batches(rows: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Indexes of `rows`, shortest first, cut into batches of at most `batch_tokens` padded tokens."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(rows[i]) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _embed(sess, rows: list[list[int]], start: tuple[list[int], dict] | None = None,
           batch_tokens: int = 0) -> tuple[np.ndarray, float]:
    out: list[np.ndarray | None] = [None] * len(rows)
    began = time.perf_counter()
    for index, embeddings in _embedded(sess, rows, start, batch_tokens):
        for i, e in zip(index, embeddings):
            out[i] = e
    return np.stack(out), time.perf_counter() - began


def _embedded(sess, rows: list[list[int]], start: tuple[list[int], dict] | None,
              batch_tokens: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yields the indexes of each batch of `_batched` and their last-token embeddings."""
    from . import verify

    for index, batch, past in _batched(rows, start, batch_tokens):
        yield index, verify.last_token(verify.onnx_hidden(sess, batch, past), batch.attention_mask)


def _batched(rows: list[list[int]], start: tuple[list[int], dict] | None,
             batch_tokens: int) -> Iterator[tuple[list[int], "verify.Batch", dict | None]]:
    """The batches of `_batches` as graph inputs, shortest rows first: (indexes, batch, past states).

    Right padding leaves each row's last real token as it is alone (attention is causal); only
    the summation order of the matrix products differs. Rows on the start states and rows without
    them (not beginning with its ids, or nothing after them) are batched apart."""
    from . import verify

    k = len(start[0]) if start else 0
    on_start = [bool(k) and row[:k] == start[0] and len(row) > k for row in rows]
    for group in (True, False):
        members = [i for i in range(len(rows)) if on_start[i] == group]
        for part in _batches([rows[i] for i in members], batch_tokens):
            index = [members[j] for j in part]
            batch = verify.right_padded([rows[i] for i in index], pad_id=0)
            if group:
                yield index, verify.without_start(batch, k), start[1]
            else:
                yield index, batch, None


def _embed_segmented(segmented, rows: list[list[int]], start: tuple[list[int], dict] | None,
                     batch_tokens: int) -> tuple[np.ndarray, float]:
    """`_embed`, with the graph run one layer at a time (a `stream.SegmentedGraph`), every batch
    in lockstep: one layer's weights in memory instead of all of them (a whole int8 graph of
    bge-en-icl is 7-8 GB of mapped weights)."""
    from . import stream, verify

    empty = segmented.empty_past()
    batches = list(_batched(rows, start, batch_tokens))
    runs = [stream.Run({**batch.feeds(), **(past if past is not None else empty)}, set()) for _, batch, past in batches]
    out: list[np.ndarray | None] = [None] * len(rows)

    def pool(run: int, name: str, value: np.ndarray) -> None:
        if name == "last_hidden_state":
            index, batch, _ = batches[run]
            for i, e in zip(index, verify.last_token(value, batch.attention_mask)):
                out[i] = e

    began = time.perf_counter()
    segmented.run(runs, pool)
    return np.stack(out), time.perf_counter() - began


def fidelity(reference: np.ndarray, embeddings: np.ndarray, rows: list[list[int]]) -> dict:
    return _figures(np.sum(reference * embeddings, axis=1), rows)


def _figures(cos: np.ndarray, rows: list[list[int]]) -> dict:
    worst = int(np.argmin(cos))
    return {"texts": len(rows), "min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6),
            "worst_tokens": len(rows[worst])}


def _can_meet(cos: np.ndarray, thresholds: dict) -> bool:
    """Whether the rows still to run (NaN) could bring `cos` up to `thresholds`, each at best 1.0."""
    done = ~np.isnan(cos)
    best_mean = (cos[done].sum() + (~done).sum()) / len(cos)
    return cos[done].min() >= thresholds["min_cosine"] and best_mean >= thresholds["mean_cosine"]


def measure_candidate(graph: Path, rows: list[list[int]], reference: np.ndarray, threads: int = 2,
                      start: tuple[list[int], dict] | None = None, batch_tokens: int = 0,
                      thresholds: dict | None = None) -> dict:
    """`fidelity` of `graph` on `rows` against `reference`, and the seconds its pass took.

    The graph runs one layer at a time (`_embed_segmented`): a candidate that keeps `down` fp32 is
    12.6 GB at bge-en-icl's depth, more than an export may hold (8 GiB). With `thresholds`, the
    `FIRST_ROUND` shortest texts run first and the rest only if the thresholds can still be met
    after them (a cosine under the minimum, or a mean that even perfect remaining texts would
    leave short, ends it): the figures are then those of the texts run, and `stopped` is true.
    One- and two-token inputs are where recipes fail, so most misses cost one short round."""
    from . import stream

    segmented = stream.SegmentedGraph(graph, threads)  # loaded and split once for both rounds
    if thresholds is None:
        rounds = [list(range(len(rows)))]
    else:
        order = [i for index, _, _ in _batched(rows, start, batch_tokens) for i in index]
        rounds = [order[:FIRST_ROUND], order[FIRST_ROUND:]]
    cos = np.full(len(rows), np.nan)
    seconds, stopped = 0.0, False
    for index in [r for r in rounds if r]:
        embeddings, took = _embed_segmented(segmented, [rows[i] for i in index], start, batch_tokens)
        cos[index] = np.sum(reference[index] * embeddings, axis=1)
        seconds += took
        if thresholds is not None and not _can_meet(cos, thresholds):
            stopped = bool(np.isnan(cos).any())
            break
    done = np.flatnonzero(~np.isnan(cos))
    fid = _figures(cos[done], [rows[i] for i in done])
    return {**fid, **({"stopped": True} if stopped else {}), "seconds": round(seconds, 2)}


def meets(fid: dict, thresholds: dict = FIDELITY) -> bool:
    return fid["min_cosine"] >= thresholds["min_cosine"] and fid["mean_cosine"] >= thresholds["mean_cosine"]


_PRECISION = ("weight_bits", "outliers", "outliers_by_kind", "keep")


def _kinds_kept(recipe: Recipe) -> set[str] | None:
    """The MatMul kinds a w8a8 recipe keeps fp32 (`keep` entries of the form `[./]kind[./]`), or
    None when a `keep` entry is another kind of regex."""
    kinds = set()
    for pattern in recipe.settings.get("keep", []):
        m = re.fullmatch(r"\[\./\]([A-Za-z_]+)\[\./\]", pattern)
        if m is None:
            return None
        kinds.add(m.group(1))
    return kinds


def _at_least_as_precise(a: Recipe, b: Recipe) -> bool:
    """Whether `a` computes every MatMul at least as precisely as `b`: both w8a8 and alike but for
    precision, weights of at least as many bits, and for each MatMul kind either fp32 in `a` or,
    in both int8, at least as many outlier channels in `a` (the top-k channel lists are nested,
    and masking more of them leaves a finer per-token step for the rest). A heuristic over a deep
    network, not a bound: `choose` skips `b` once `a` has missed."""
    if a.method != "w8a8" or b.method != "w8a8":
        return False
    if {k: v for k, v in a.settings.items() if k not in _PRECISION} != \
            {k: v for k, v in b.settings.items() if k not in _PRECISION}:
        return False
    kept_a, kept_b = _kinds_kept(a), _kinds_kept(b)
    if kept_a is None or kept_b is None:  # other regexes: comparable only when the same
        if a.settings.get("keep") != b.settings.get("keep"):
            return False
        kept_a = kept_b = set()
    if a.settings.get("weight_bits", 8) < b.settings.get("weight_bits", 8):
        return False

    def outliers(r: Recipe, kind: str | None) -> int:
        return int(r.settings.get("outliers_by_kind", {}).get(kind, r.settings.get("outliers", 0)))

    kinds = set(a.settings.get("outliers_by_kind", {})) | set(b.settings.get("outliers_by_kind", {})) | kept_a | kept_b
    for kind in [*kinds, None]:  # None: every kind not named
        if kind in kept_a:
            continue
        if kind in kept_b or outliers(a, kind) < outliers(b, kind):
            return False
    return True


def _more_precise(a: Recipe, b: Recipe) -> bool:
    return _at_least_as_precise(a, b) and not _at_least_as_precise(b, a)


def choose(fp32: Fp32Model, dst: Path, tokenizer, candidates: list[str] | None = None, threads: int = 2,
           max_length: int = 512, thresholds: dict = FIDELITY) -> dict:
    """Quantize `dst` with the first (fastest) recipe of `candidates` that is faithful on the
    calibration texts; returns the manifest's `quantization` field (the recipe and the selection).

    The last candidate is taken if none passes (the export's own parity check still applies).
    The most precise of the others (those no other candidate is more precise than,
    `_at_least_as_precise`) are tried first, until one passes; then the others fastest first,
    skipping each that a candidate which missed is at least as precise as. So a model on which no
    fast recipe can pass costs two of them, not twelve (about 5 min each at bge-en-icl's depth),
    and one on which a fast recipe passes costs one more than in plain speed order.
    When every input begins with the same ids (a BOS), their states are computed in fp32, written
    beside `dst` as `START_FILE` and used in the measurement, as the runtime uses them: position 0,
    where a trained model keeps its huge attention-sink activations, is never quantized. The fp32
    model runs once, one layer at a time (`Fp32Model.measure`); each candidate is written from it
    tensor by tensor and run one layer at a time too, until it meets the thresholds or cannot any
    more (`measure_candidate`).
    """
    from . import verify

    names = candidates or CANDIDATES
    if not names:
        raise ValueError("no int8 candidates")
    rows = calibration_rows(tokenizer, max_length)
    ids = verify.start_ids(tokenizer, fp32.input_names())
    measured = fp32.measure(rows, ids, threads)
    log.info("fp32 reference over %d calibration texts in %.1f s (one layer at a time)", len(rows), measured.seconds)
    dst.with_name(START_FILE).unlink(missing_ok=True)
    tried: list[dict] = []
    on_disk = None  # the recipe dst holds

    def attempt(name: str, final: bool = False) -> bool:
        nonlocal on_disk
        recipe = RECIPES[name]
        fp32.quantize(recipe, dst, measured.stats)
        on_disk = name
        batch_tokens = SELECTION_BATCH_TOKENS if recipe.method == "matmulnbits" else 0
        # The last candidate is taken whatever it measures, so its figures cover every text.
        fid = measure_candidate(dst, rows, measured.reference, threads, measured.start, batch_tokens,
                                None if final else thresholds)
        # One pass, on whatever else the machine runs: a speed class, not a benchmark.
        tried.append({"recipe": name, **fid})
        log.info("int8 candidate %s: min cosine %.6f, mean %.6f on %d%s calibration texts (%.1f s)", name,
                 fid["min_cosine"], fid["mean_cosine"], fid["texts"],
                 f" of {len(rows)} (stopped: cannot meet the thresholds)" if fid.get("stopped") else "",
                 fid["seconds"])
        if meets(fid, thresholds) or final:
            return True
        for p in (dst, dst.with_name(dst.name + ".data")):
            p.unlink(missing_ok=True)
        on_disk = None
        return False

    def chosen(name: str) -> dict:
        if on_disk != name:  # a probe that passed, overwritten by later candidates
            fp32.quantize(RECIPES[name], dst, measured.stats)
        if measured.start:
            verify.write_start_graph(dst.with_name(START_FILE), measured.start[1])
        fid = next(t for t in tried if t["recipe"] == name)
        return {**RECIPES[name].describe(),
                "selection": {"texts": f"{CALIBRATION.name} + {len(SHORT_TEXTS)} short texts",
                              "cpu": cpu_class(), "threads": threads,
                              "start_states": measured.start[0] if measured.start else None,
                              "thresholds": dict(thresholds), "chosen": name, "faithful": meets(fid, thresholds),
                              "tried": tried, "skipped": skipped}}

    fast, failed, skipped, probe = names[:-1], [], {}, None
    ceilings = [n for n in fast if not any(_more_precise(RECIPES[m], RECIPES[n]) for m in fast)]
    if len(ceilings) < len(fast):
        for name in ceilings:  # what these miss, the less precise recipes are taken to miss too
            if attempt(name):
                probe = name  # passed
                break
            failed.append(name)
    for name in fast:
        if name == probe:
            return chosen(name)
        if name in failed:
            continue
        above = next((f for f in failed if _at_least_as_precise(RECIPES[f], RECIPES[name])), None)
        if above is not None:
            skipped[name] = above  # a recipe at least as precise everywhere missed
            continue
        if attempt(name):
            return chosen(name)
        failed.append(name)
    attempt(names[-1], final=True)
    return chosen(names[-1])


# --- the comparison (not part of an export) -----------------------------------------------------


def compare(model_dir: Path, fp32_graph: Path, names: list[str], runs: int = 3, threads: int = 2) -> list[dict]:
    """Each recipe's fidelity on the calibration rows and tokens/s (each row alone), alternating
    recipes within each run so that a shared machine's load hits them alike; medians."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = calibration_rows(tokenizer)
    tokens = sum(map(len, rows))
    measured = Fp32Model.from_graph(fp32_graph).measure(rows, [], threads)
    reference, stats = measured.reference, measured.stats
    table = {"fp32": {"recipe": "fp32 graph", "min_cosine": 1.0, "mean_cosine": 1.0, "times": []}}
    with tempfile.TemporaryDirectory(dir=fp32_graph.parent.parent) as tmp:
        graphs = {"fp32": fp32_graph}
        for name in names:
            dst = Path(tmp) / name / "model.onnx"
            quantize(fp32_graph, dst, RECIPES[name], stats)
            emb, _ = embed_rows(dst, rows, threads)
            table[name] = {"recipe": name, **fidelity(reference, emb, rows), "times": []}
            graphs[name] = dst
            log.info("%s", table[name])
        for _ in range(runs):
            for name, graph in graphs.items():
                table[name]["times"].append(embed_rows(graph, rows, threads)[1])
    if runs:
        fp32_speed = tokens / statistics.median(table["fp32"]["times"])
    for row in table.values():
        row["tokens_per_s"] = tokens / statistics.median(row["times"]) if runs else float("nan")
        row["vs_fp32"] = row["tokens_per_s"] / fp32_speed if runs else float("nan")
    return list(table.values())


def add_int8(model_dir: Path, package: Path, names: list[str], threads: int = 2) -> dict:
    """(Re)build `package`'s int8 variant from its fp32 graph with `choose` over `names`, check it
    against the fp32 graph on the export's samples and record it in `embedder.json`: a new int8
    recipe without exporting again. The parity reference is the fp32 graph, not PyTorch."""
    import json

    from transformers import AutoTokenizer

    from . import manifest, samples, verify

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = json.loads((package / "embedder.json").read_text(encoding="utf-8"))
    fp32 = package / "fp32" / "model.onnx"
    dst = package / "int8" / "model.onnx"
    quantization = choose(Fp32Model.from_graph(fp32), dst, tokenizer, names, threads)
    rows = [s.ids for s in samples.samples(tokenizer)]
    batch = verify.right_padded(rows, meta["special_tokens"]["pad_id"])
    reference = verify.last_token(verify.onnx_hidden(verify.session(fp32, threads), batch), batch.attention_mask)
    start = verify.start_of(dst, quantization)
    parity = verify.verify_variant("int8", dst, batch, reference, verify.THRESHOLDS["int8"], None, threads,
                                   samples.prefix_sharing(tokenizer), start)
    parity["reference"] = "fp32 graph"
    meta["variants"]["int8"] = manifest.variant_entry(package, "int8", "int8", quantization, parity,
                                                      start[0] if start else None)
    manifest.write(package, meta)
    return meta["variants"]["int8"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (for its tokenizer)")
    parser.add_argument("--fp32", type=Path, required=True, help="the exported fp32 model.onnx")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--add-to", type=Path, default=None,
                        help="instead of comparing: choose among --recipes and (re)write this package's int8 variant")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.add_to is not None:
        entry = add_int8(args.model, args.add_to, args.recipes.split(","), args.threads)
        print(entry["quantization"], entry["parity"])
        return 0
    table = compare(args.model, args.fp32, args.recipes.split(","), args.runs, args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| recipe | min cosine | mean cosine | worst text (tokens) | tokens/s | vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['recipe']} | {row['min_cosine']:.4f} | {row['mean_cosine']:.5f} | {row.get('worst_tokens', '-')} "
              f"| {row['tokens_per_s']:.0f} | {row['vs_fp32']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
